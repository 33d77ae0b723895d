"""Loaded by Hydra's plugin scan (DVC points `hydra.plugins_path` at src/), so that
`dvc exp run` can resolve lmpipe's OmegaConf resolvers while composing params.yaml."""

from lmpipe.runs.config import register_resolvers

register_resolvers()
