#!/usr/bin/env bash
# make gpu-check: on a machine with an NVIDIA GPU, run qkv's GPU tests (CuPy and Triton kernels
# compiled for the real GPU) and then the GPU benchmarks, in one go, without network access.
#
#   bash benchmarks/gpu_check.sh            # or: make gpu-check
#
# Needs python3 with numpy, cupy, torch (CUDA build), triton, pytest, hypothesis and rich
# (PYTHON=... picks another interpreter). qkv itself is installed editable without network or,
# if that fails, imported from this checkout through PYTHONPATH.
# Writes (to $OUT when set, so a remote runner brings them back; else benchmarks/results/):
#   gpu.json (benchmark results), gpu-tests.xml and gpu-tests.log (test report), gpu-bench.log.
# Exit status: 0 when every GPU test passed (none skipped) and every benchmarked qkv kernel ran
# and agreed with torch SDPA; 1 otherwise; 2 when this machine cannot run the check at all.
# Time: at most about 8 minutes on an H200 (tests capped at 300 s, benchmarks at 180 s).

set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}

fail() {
    echo "gpu-check: $*" >&2
    exit 2
}

# ------------------------------------------------------------------ can this machine run it?
command -v nvidia-smi >/dev/null 2>&1 ||
    fail "nvidia-smi not found: no NVIDIA driver on this machine; run 'make gpu-check' on a machine with an NVIDIA GPU"
nvidia-smi -L 2>/dev/null | grep -q '^GPU' ||
    fail "nvidia-smi lists no GPU; run 'make gpu-check' on a machine with an NVIDIA GPU"
command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (set PYTHON=...)"
"$PYTHON" - <<'EOF' || fail "the Python environment cannot run the GPU check (see above)"
import importlib.util
import sys

needed = ("numpy", "cupy", "torch", "triton", "pytest", "hypothesis", "rich")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (no network here: carry wheels)")
import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)")
import cupy

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cupy {cupy.__version__}, "
      f"{cupy.cuda.runtime.getDeviceCount()} CUDA device(s): {torch.cuda.get_device_name()}")
EOF

# ------------------------------------------------------------------ qkv, without network
mkdir -p "$RESULTS"
PYTEST_PLUGIN=()
if "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$RESULTS/pip.log" 2>&1; then
    echo "gpu-check: qkv installed editable"
else
    echo "gpu-check: editable install failed (see $RESULTS/pip.log); using PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # Load the qkv pytest plugin by name unless an earlier install registered its entry point
    # (pytest refuses a plugin registered twice).
    "$PYTHON" - <<'EOF' && PYTEST_PLUGIN=(-p qkv.testing.plugin)
import importlib.metadata
import importlib.util
import sys

registered = any(ep.name == "qkv" for ep in importlib.metadata.entry_points(group="pytest11"))
sys.exit(registered or importlib.util.find_spec("qkv.testing.plugin") is None)
EOF
fi
"$PYTHON" -c "import qkv; print('qkv', qkv.__version__, 'from', qkv.__file__)" ||
    fail "qkv does not import"

nvidia-smi

# ------------------------------------------------------------------ GPU tests
# Only the files that hold GPU tests are collected, so a CPU-only test module whose imports are
# missing here (docs, notebooks) cannot break the check.
mapfile -t gpu_files < <(grep -rlE 'mark\.gpu' tests --include='*.py' | sort)
[ "${#gpu_files[@]}" -gt 0 ] || fail "no GPU tests (pytest.mark.gpu) found under tests/"
echo "=== GPU tests (pytest -m gpu: ${gpu_files[*]}) ==="
QKV_GPU=1 PYTHONUNBUFFERED=1 timeout 300 "$PYTHON" -m pytest "${gpu_files[@]}" -m gpu -p no:cacheprovider \
    "${PYTEST_PLUGIN[@]}" -q -rs --junitxml="$RESULTS/gpu-tests.xml" 2>&1 | tee "$RESULTS/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
# On a GPU machine a skipped GPU test is a failure of the check: it hides a broken set-up.
skipped=$("$PYTHON" - "$RESULTS/gpu-tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
    print(sum(int(s.get("skipped", 0)) for s in suites))
except (OSError, ET.ParseError):
    print(-1)
EOF
)

# ------------------------------------------------------------------ GPU benchmarks
echo "=== GPU benchmarks ==="
PYTHONUNBUFFERED=1 timeout 180 "$PYTHON" benchmarks/gpu_bench.py --budget-s 140 \
    --out "$RESULTS/gpu.json" 2>&1 | tee "$RESULTS/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}

# ------------------------------------------------------------------ verdict
status=0
if [ "$tests_rc" -ne 0 ]; then
    echo "gpu-check: GPU tests FAILED (pytest exit $tests_rc; 124 = timed out)"
    status=1
fi
if [ "$skipped" != "0" ]; then
    echo "gpu-check: $skipped GPU test(s) skipped or no test report (-1): every GPU test must run here"
    status=1
fi
if [ "$bench_rc" -ne 0 ]; then
    echo "gpu-check: GPU benchmarks FAILED (exit $bench_rc; 124 = timed out)"
    status=1
fi
[ "$status" -eq 0 ] && echo "gpu-check: all GPU tests passed; benchmarks in $RESULTS/gpu.json"
exit "$status"
