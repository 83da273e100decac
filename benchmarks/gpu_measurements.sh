#!/usr/bin/env bash
# Every GPU figure of the README's Performance section in one run, about 8 minutes on one H100 / H200:
#   1. the training DataLoader of run_pretraining.py, 1 .. 14 workers (batches of 64: as fast per image as 256, and
#      enough of them for 14 workers), against the previous float32 pipeline and the decode-only ceiling
#      (benchmarks/benchmark_data.py);
#   2. the model step and feature extraction, eager, against mmpretrain eager, with peak memory (benchmark.py);
#   3. the same compiled, against mmpretrain eager and mmpretrain compiled (benchmark.py --compile);
#   4. end to end: run_pretraining.py --train_dir (generated JPEGs) --bf16, compiled (the default on CUDA), images/s
#      over the steps after the first (data loading included).
# Base model, batch 256, bf16 autocast. Each stage has its own time limit and the run goes on when one fails.
#
#   bash benchmarks/gpu_measurements.sh [--smoke] [LOG_DIR]     # LOG_DIR: default $OUT, else ./gpu_measurements
#   STAGES=compiled,e2e bash benchmarks/gpu_measurements.sh     # only some stages (data, eager, compiled, e2e)
#
# mmpretrain and its dependencies are installed (no index, no dependencies resolved) from wheels in .whl/ when that
# folder exists and mmpretrain is not importable. --smoke runs every stage at toy sizes on whatever device there is
# (the CPU included), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
    shift
fi
LOG_DIR=${1:-${OUT:-gpu_measurements}}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
PYTHON=${PYTHON:-python}
exec > >(tee -a "$LOG_DIR/gpu_measurements.log") 2>&1

if [[ $SMOKE == 1 ]]; then
    MODEL=(--arch tiny --batch-size 2 --image-size 32 --repeats 2 --iterations 1)
    DATA=(--images 24 --jpeg-size 100x75 --image-size 32 --batch-size 4 --workers 1 2 --repeats 1)
    E2E=(--arch tiny --config_overrides image_size=32 --per_device_train_batch_size 4 --max_steps 4 --torch_compile True)
    E2E_IMAGES=(24 100x75)
    LIMIT=(900 900 1800 1800)
else
    MODEL=(--arch base --batch-size 256 --dtype bf16 --repeats 3 --iterations 3)
    DATA=(--images 3072 --batch-size 64 --workers 1 2 4 8 14 --repeats 3)
    E2E=(--arch base --per_device_train_batch_size 256 --bf16 True --dataloader_num_workers 14 --max_steps 30)
    E2E_IMAGES=(8192 500x375)  # 30 steps of 256 in one epoch
    LIMIT=(120 150 270 180)
fi
OURS="hivit-mae (ours)"
MMPRETRAIN="mmpretrain MAE-HiViT"

STAGES=",${STAGES:-data,eager,compiled,e2e},install,"

stage() {  # stage KEY NAME SECONDS COMMAND...: run with a time limit, log the time taken and the exit status
    local key=$1 name=$2 limit=$3 start=$SECONDS
    shift 3
    [[ $STAGES == *",$key,"* ]] || return 0
    echo
    echo "=== $name ($(date -u '+%Y-%m-%d %H:%M:%S') UTC, limit ${limit}s)"
    echo "+ $*"
    timeout --kill-after 10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start))s"
}

echo "=== gpu_measurements.sh $([[ $SMOKE == 1 ]] && echo --smoke) in $(pwd) at commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
echo "CPU cores: $(nproc)"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if ! "$PYTHON" -c "import mmpretrain" 2>/dev/null && [[ -d .whl ]]; then
    stage install "install mmpretrain from .whl/" 120 "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
"$PYTHON" -c "import mmpretrain, mmengine; print('mmpretrain', mmpretrain.__version__, 'mmengine', mmengine.__version__)"

stage data "data pipeline" "${LIMIT[0]}" "$PYTHON" benchmarks/benchmark_data.py "${DATA[@]}" --baseline \
    --json "$LOG_DIR/data_pipeline.json"
stage eager "model, eager" "${LIMIT[1]}" "$PYTHON" benchmarks/benchmark.py "${MODEL[@]}" --only "$OURS" "$MMPRETRAIN" \
    --json "$LOG_DIR/model_eager.json"
stage compiled "model, compiled" "${LIMIT[2]}" "$PYTHON" benchmarks/benchmark.py "${MODEL[@]}" --compile \
    --only "$OURS" "$MMPRETRAIN" "$MMPRETRAIN compiled" --json "$LOG_DIR/model_compiled.json"

if [[ $STAGES == *",e2e,"* ]]; then
    JPEGS="$LOG_DIR/jpegs"
    "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import benchmark_data as b; \
w, h = map(int, '${E2E_IMAGES[1]}'.split('x')); b.make_jpegs(Path('$JPEGS'), ${E2E_IMAGES[0]}, (w, h))"
    stage e2e "end to end, run_pretraining.py" "${LIMIT[3]}" "$PYTHON" run_pretraining.py --train_dir "$JPEGS" \
        "${E2E[@]}" --output_dir "$LOG_DIR/pretraining" --save_strategy no --reconstruction_figure False \
        --logging_steps 10
    "$PYTHON" - "$LOG_DIR/pretraining/pretraining_summary.json" <<'EOF'
import json, sys

summary = json.load(open(sys.argv[1]))
print(
    f"end to end: {summary['images_per_second']:.0f} images/s over steps 2-{summary['global_step']} "
    f"(median step {summary['median_step_seconds'] * 1000:.0f} ms, first step {summary['first_step_seconds']:.1f} s, "
    f"compilation {summary.get('compile_seconds', 0):.1f} s)"
)
EOF
    rm -rf "$JPEGS" "$LOG_DIR/pretraining/"*.safetensors
fi
echo "=== done: $LOG_DIR/gpu_measurements.log"
