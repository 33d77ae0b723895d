"""lmpipe: train language models as a reproducible, tracked DVC + Hydra + MLflow DAG."""

__version__ = "0.1.0"
