#!/usr/bin/env bash
# The GPU check: lmpipe's library below the stages, and its GPU tests, on a CUDA machine as it
# is (a Python with torch >= 2.11, transformers and peft; no venv, no network). Wheels of what
# that Python lacks travel in .whl/ (make gpu-wheels) and are installed into a private
# directory first. Run from the repository root:
#
#     bash scripts/gpu_check.sh                 # GPU_PYTHON=python3 by default
#
# It fails on a machine without a CUDA GPU and when any GPU test skips (but for one that
# needs more GPUs than the machine has, which says so); LMPIPE_GPU_CHECK_DEVICE=cpu runs the
# same code on the CPU as a dry run, which checks nothing about a GPU. Then it measures: the
# 125M preset's tokens/s and MFU against the GPU's dense bf16 peak, and masked-LM against
# causal-LM throughput. Output: the versions, each test, each measurement.
set -uo pipefail
PY=${GPU_PYTHON:-python3}
SITE=${LMPIPE_SITE:-/tmp/lmpipe-site}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "gpu check: installing .whl/ failed"; exit 1; }
  # PYTHONPATH precedes site-packages: carry only what the machine lacks (gpu-wheels.txt).
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
DEVICE=${LMPIPE_GPU_CHECK_DEVICE:-cuda}
"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys

import peft
import torch
import transformers

device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
if device == "cpu":
    print("LMPIPE_GPU_CHECK_DEVICE=cpu: a DRY RUN of the check's code on the CPU, not a GPU check")
elif not torch.cuda.is_available():
    sys.exit("gpu check FAILED: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
else:
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF
status=0
select=()
if [ "$DEVICE" != cpu ]; then
  export LMPIPE_GPU_CHECK=1
else  # the 125M preset for 30 steps would take the CPU most of an hour
  select=(-k "not 125m")
  echo "dry run: the 125M preset's MFU test deselected"
fi
echo "--- GPU tests (tests marked gpu; the stage-level one needs dvc and mlflow: deselected)"
"$PY" -m pytest -m "gpu and not stages" -p no:cacheprovider -q -s -rfEs "${select[@]}" \
  tests/test_gpu.py tests/test_gpu_methods.py || status=1
if [ "$DEVICE" = cpu ]; then
  echo "--- masked LM against causal LM of equal size (dry run: small models on the CPU)"
  "$PY" benchmarks/mlm_throughput.py --small --device cpu --seq-len 128 --batch-size 8 \
    --steps 5 --warmup 2 || status=1
else
  echo "--- training throughput: the 125M preset, bf16 and compile against eager fp32"
  "$PY" benchmarks/gpu_throughput.py --steps 30 --warmup 10 || status=1
  echo "--- masked LM against causal LM of equal size (bert-base, llama-125m)"
  "$PY" benchmarks/mlm_throughput.py --steps 20 --warmup 10 || status=1
fi
verdict=$([ "$status" = 0 ] && echo PASSED || echo FAILED)
if [ "$DEVICE" = cpu ]; then echo "gpu check DRY RUN $verdict (on the CPU: no GPU was checked)"
else echo "gpu check $verdict"; fi
exit "$status"
