"""lmpipe: train language models as a reproducible, tracked DVC + Hydra + MLflow DAG."""

import logging

__version__ = "0.1.0"

# torchao (weight-only int8) warns on import, through transformers too, that its CUDA kernels
# do not load on a machine without CUDA: true, and irrelevant to its CPU path.
logging.getLogger("torchao").setLevel(logging.ERROR)
