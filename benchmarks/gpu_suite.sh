#!/usr/bin/env bash
# The GPU suite (v2, issue 22) in one call (<= 9 min wall on one H100/H200: --budget-seconds 500). From the repository root:
#   bash benchmarks/gpu_suite.sh              # GPU machine: results in $OUT/gpu_results.jsonl (+ .md, .log)
#   bash benchmarks/gpu_suite.sh --dry-run    # CPU, tiny sizes (what tests/test_gpu_suite.py runs)
# Extra flags go to benchmarks/gpu_suite.py (--steps, --out, --pfl-python, --budget-seconds).
# pfl-research and dp-accounting are not on the GPU image and it has no network: they travel as
# wheels in .whl/ (recipe in benchmarks/gpu_suite.py's WHEELS note), installed here first.
set -u
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels for the GPU image's Python 3.12
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else  # the pfl step then records 'pfl not installed'; the other steps still run
    echo "gpu_suite: installing .whl/*.whl failed (wrong Python?); continuing without them" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
exec "$PY" -m benchmarks.gpu_suite "$@"
