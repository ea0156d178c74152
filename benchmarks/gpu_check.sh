#!/usr/bin/env bash
# The GPU check as one call on the GPU machine: benchmarks/gpu_check.py (tables on stdout, raw
# rows and tables under $OUT), then the kernel tests compiled on the GPU.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py flags, e.g. --budget_s=420 --sections=...]
#
# The machine's image lacks grain, ml-collections and pytest: `bash ../shared/device/wheels.sh
# pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1` fetches them into .whl/ beforehand, and the run
# carries .whl. Without pytest the compiled tests are skipped (gpu_check.py's kernel_check section
# still compares the compiled kernel with the reference).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi

python3 benchmarks/gpu_check.py --out="$OUT" "$@"

# The kernel tests compiled on the GPU last, so a short run still gets the measurements
# (TEST_PATHS narrows them, e.g. TEST_PATHS=tests/kernels/test_rms_norm.py).
if python3 -c "import pytest" 2>/dev/null; then
  echo "# compiled kernel tests (pytest -m gpu ${TEST_PATHS:-tests/kernels})"
  # shellcheck disable=SC2086  # TEST_PATHS may name several paths
  JAX_PLATFORMS=cuda timeout "${TEST_TIMEOUT_S:-150}" python3 -m pytest -q -m gpu \
    -p no:cacheprovider ${TEST_PATHS:-tests/kernels} >"$OUT/pytest_gpu.txt" 2>&1
  echo "# pytest exit status $?"
  tail -n 15 "$OUT/pytest_gpu.txt"
else
  echo "# pytest is not installed here: compiled kernel tests skipped (see the header)"
fi
