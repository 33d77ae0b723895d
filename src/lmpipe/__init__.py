"""lmpipe: train language models as a reproducible, tracked DVC + Hydra + MLflow DAG."""

import logging

__version__ = "0.1.0"

# torchao (weight-only int8), which transformers imports too, warns on import that its CUDA
# kernels do not load on a machine without CUDA, and torch that torchao registers enums the
# old way: true, and irrelevant to what lmpipe runs.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
