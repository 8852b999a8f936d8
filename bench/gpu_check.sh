#!/usr/bin/env bash
# The prepared command for a lent GPU machine (docs/gpu.md): install the carried wheels and moeyard,
# then run the check; results land in $OUT/gpu_check.json. Arguments go to bench/gpu_check.py
# (e.g. --stages b to rerun one stage).
set -uo pipefail
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  # grpcio, protobuf and grpcio-health-checking at our pins (the generated stubs check them at import)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package itself (the machine has setuptools); the check runs from the bare tree as well
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || echo "pip install -e . failed: running from the source tree (moeyard.source_tree)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m bench.gpu_check --device cuda "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
