#!/usr/bin/env bash
# The GPU paths end to end, on a machine with GPUs (CI has none; tests/test_gpu_readiness.py checks what a CPU can):
#   bash analysis/gpu_check.sh [out_dir]       (PYTHON=python3 to choose the interpreter)
# trainer=gpu (bf16-mixed), trainer=ddp, mode=pipeline with NCCL (needs one GPU per chunk: refused on one GPU),
# then analysis/bench.py where activations dominate (model=base, batch 32 x 256), float32, bf16-mixed, and float32
# with each chunk's head scored in 8 slices of the sequence (loss_slices=8).
# Each step prints its last lines; the bench tables and JSON go to out_dir (default gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_check}
mkdir -p "$OUT_DIR"
LOGS=$(mktemp -d)
"${PYTHON:-python}" -c "import torch; print('torch', torch.__version__, '| GPUs:', [torch.cuda.get_device_name(i) for i in \
range(torch.cuda.device_count())])"
step() {  # step <name> <timeout s> <command...>: run it, print its end and its exit status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep -E "final val|error|Error|trained|tokens/s" "$OUT_DIR/$name.log" | tail -4
    echo "== $name: exit $rc in $((SECONDS - start)) s"
}
COMMON=(trainer.max_steps=200 trainer.enable_progress_bar=false "paths.log_dir=$LOGS")
step gpu_bf16 90 "${PYTHON:-python}" run.py trainer=gpu "${COMMON[@]}"
step gpu_bf16_sequential 90 "${PYTHON:-python}" run.py trainer=gpu mode=sequential "${COMMON[@]}"
step ddp 90 "${PYTHON:-python}" run.py trainer=ddp "${COMMON[@]}"
step pipeline_nccl 60 "${PYTHON:-python}" run.py trainer=gpu mode=pipeline chunks=2 pipeline.backend=nccl "${COMMON[@]}"
step bench_fp32 240 "${PYTHON:-python}" analysis/bench.py --device cuda --setting activations --modes joint sequential \
    --chunks 1 4 --steps 20 --warmup 3 --out "$OUT_DIR/bench_gpu_fp32.json"
sed -n '/^| mode/,$p' "$OUT_DIR/bench_fp32.log"
step bench_bf16 200 "${PYTHON:-python}" analysis/bench.py --device cuda --setting activations --modes sequential --chunks 1 4 \
    --steps 20 --warmup 3 --set trainer.precision=bf16-mixed --out "$OUT_DIR/bench_gpu_bf16.json"
sed -n '/^| mode/,$p' "$OUT_DIR/bench_bf16.log"
step bench_fp32_sliced 200 "${PYTHON:-python}" analysis/bench.py --device cuda --setting activations --modes sequential \
    --chunks 1 4 --steps 20 --warmup 3 --set loss_slices=8 --out "$OUT_DIR/bench_gpu_fp32_sliced.json"
sed -n '/^| mode/,$p' "$OUT_DIR/bench_fp32_sliced.log"
rm -rf "$LOGS"
