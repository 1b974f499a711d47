#!/usr/bin/env bash
# The GPU benchmark in one command, for a lent GPU machine (1 GPU; 2-8 if there are), < 10 minutes:
#
#     bash bench/gpu_suite.sh
#
# (a) checks CUDA and prints nvidia-smi and the driver; the GPU tests (tests/test_gpu.py); every
#     attention kernel at the A14B 720p shape (bench/attention_kernels.py);
# (b) Wan2.2 T2V-A14B architecture (random bf16 weights, one expert) at 1280x720x81 (75,600 tokens),
#     world 1, for each attention backend here (flash if importable, sdpa), eager and with the blocks
#     compiled (COMPILE=0 skips): one expert forward and one CFG step (batched CFG), built with LAYERS
#     of the 40 blocks and extrapolated to 40 per layer (the output says so); achieved TFLOP/s
#     (planner forward_flops / time) against a bf16 8192^3 matmul timed first, peak memory, the
#     planner's prediction next to each time;
# (c) with more than one GPU, a scaling sweep (SP and SP x CFG2) over 2, 4, 8 GPUs with MULTI_LAYERS.
# Time limits: (a) 150 s, (b) 330 s, (c) 240 s (the sweep only runs with several GPUs, and then (b)
# should be cut with COMPILE=0), so the script stays inside a 10-minute command.
# Results: bench/scaling.py's JSON and PNG plus this log, under $OUT if set, else bench/results/.
# Settings: LAYERS (8), MULTI_LAYERS (4), PY (python with CUDA torch; .venv's if it has CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-bench/results}"
LAYERS="${LAYERS:-8}"
COMPILE="${COMPILE:-1}"
MULTI_LAYERS="${MULTI_LAYERS:-4}"
mkdir -p "$OUT_DIR"
if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
        && PY=.venv/bin/python
fi

# (a) the machine
nvidia-smi || { echo "nvidia-smi failed: no NVIDIA driver here"; exit 1; }
nvidia-smi --query-gpu=index,name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
"$PY" -c "
import torch, sys
if not torch.cuda.is_available():
    sys.exit(f'CUDA not available to {sys.executable} (torch {torch.__version__}); set PY to a CUDA build')
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, '
      f'NCCL {torch.cuda.nccl.version()}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}')
" || exit 1
TAG=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from launcher import machine_tag; print(machine_tag('cuda'))")
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
LOG="$OUT_DIR/$(date +%F)_${TAG}_gpu_suite.log"
BACKENDS=sdpa
"$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('flash_attn_interface') or u.find_spec('flash_attn')))" \
    && BACKENDS=flash,sdpa
echo "machine $TAG, attention backends: $BACKENDS, log: $LOG"
{
    echo "== (a) GPU tests and attention kernels"
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    timeout 60 "$PY" bench/attention_kernels.py --out "$OUT_DIR"
} 2>&1 | tee "$LOG"
[ "$COMPILE" = 1 ] && BACKENDS="$BACKENDS,${BACKENDS//,/+compile,}+compile"

# (b) world 1, full-size architecture, LAYERS blocks
{
    echo "== (b) A14B 1280x720x81, world 1, $LAYERS of 40 layers (times extrapolated x 40/$LAYERS), eager"
    timeout 330 "$PY" bench/scaling.py --device cuda --preset wan2.2-t2v-a14b --size 1280x720 --frames 81 \
        --worlds 1 --layouts 1 --layers "$LAYERS" --backends "$BACKENDS" --measure forward,step \
        --steps 3 --warmup 2 --out "$OUT_DIR" --write-calibration "$OUT_DIR/$(date +%F)_${TAG}_calibration.json"
    echo "exit status $?"
} 2>&1 | tee -a "$LOG"

# (c) several GPUs: scaling curves (a second JSON/PNG; the world-1 one above is kept under its own name)
if [ "$GPUS" -gt 1 ]; then
    WORLDS=$("$PY" -c "print(','.join(str(w) for w in (1, 2, 4, 8) if w <= $GPUS))")
    {
        echo "== (c) scaling over worlds $WORLDS, $MULTI_LAYERS of 40 layers"
        mkdir -p "$OUT_DIR/multi"
        timeout 240 "$PY" bench/scaling.py --device cuda --preset wan2.2-t2v-a14b --size 1280x720 --frames 81 \
            --worlds "$WORLDS" --layouts SP,SPxCFG2 --layers "$MULTI_LAYERS" --backends "${BACKENDS%%,*}" \
            --steps 3 --warmup 1 --out "$OUT_DIR/multi"
        echo "exit status $?"
    } 2>&1 | tee -a "$LOG"
fi
