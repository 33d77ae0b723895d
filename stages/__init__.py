"""The six pipeline stages; each is `python -m stages.<name>` (a Hydra app over params.yaml)."""
