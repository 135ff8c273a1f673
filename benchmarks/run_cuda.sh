#!/usr/bin/env bash
# The benchmark suite on one CUDA device, as one call (this is how the GPU
# figures in benchmarks/README.md and the README were produced).
#
#   bash benchmarks/run_cuda.sh [OUTPUT_DIR]      # default: benchmarks/results/cuda_h100
#
# Environment: CRANE_DATA_ROOT (folder holding tiktok/, default ../shared/data),
# PYTHON (default python3), DEVICE (default cuda; DEVICE=cpu QUICK=1 is the
# smoke test of this script), QUICK=1 (tiny sizes, seconds).
# Every benchmark has its own time limit, so one that hangs or runs out of
# memory costs its own figures only; the log says which finished.
set -u
out=${1:-benchmarks/results/cuda_h100}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
data=${CRANE_DATA_ROOT:-../shared/data}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run LIMIT_SECONDS NAME ARGS...
    local limit=$1 name=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$py" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c 'import torch, torch_geometric as g; print("torch", torch.__version__, "pyg", g.__version__)'

if [ "${QUICK:-0}" = 1 ]; then
    run 120 tiktok_epoch_time benchmarks/tiktok_epoch_time.py --device "$device" \
        --data-root "$data" --models crane,crane-bf16,crane-cache5,freedom --epochs 3 \
        --warmup 0 --output "$out/tiktok_epoch_time.json"
    run 120 backends benchmarks/backends.py --device "$device" --quick --in-process \
        --output "$out/backends.json"
    run 120 attention_memory benchmarks/attention_memory.py --device "$device" --quick \
        --in-process --output "$out/attention_memory.json"
    run 120 scalability benchmarks/scalability.py --device "$device" --quick --in-process \
        --output "$out/scalability.json"
    run 120 electronics_scale benchmarks/electronics_scale.py --device "$device" --quick \
        --precisions fp32,bf16 --semantic-cache 2 --output "$out/electronics_scale.json"
    run 120 electronics_scale_minibatch benchmarks/electronics_scale.py --device "$device" \
        --quick --semantic-cache 2 --num-neighbors 5,5 \
        --output "$out/electronics_scale_minibatch55.json"
    exit 0
fi

run 60 train_amazon examples/train_amazon.py --device "$device" --epochs 2 --quiet \
    --output "$out/train_amazon_smoke"
run 400 tiktok_epoch_time benchmarks/tiktok_epoch_time.py --device "$device" --breakdown \
    --data-root "$data" --epochs 5 --threads 8 --output "$out/tiktok_epoch_time.json" \
    --models crane,crane-bf16,crane-tf32,crane-cache50,crane-cache50-bf16,crane-compiled,crane-compiled-bf16,crane-compiled-cache10-bf16,freedom,lightgcn
run 90 backends benchmarks/backends.py --device "$device" --in-process \
    --edges 2e5 8e5 3.2e6 --output "$out/backends.json"
run 60 attention_memory benchmarks/attention_memory.py --device "$device" --in-process \
    --cap-gb 60 --all-items-sizes 1e3 2e3 4e3 8e3 1.6e4 3.2e4 6.4e4 \
    --output "$out/attention_memory.json"
run 170 scalability benchmarks/scalability.py --device "$device" --in-process \
    --scale 16 --output "$out/scalability.json"
run 600 electronics_scale benchmarks/electronics_scale.py --device "$device" \
    --precisions fp32,bf16,tf32 --semantic-cache 50 --output "$out/electronics_scale.json"
# mini-batch [5,5] + the semantic cache: the setting that met the CPU Electronics targets
run 400 electronics_scale_minibatch benchmarks/electronics_scale.py --device "$device" \
    --precisions fp32,bf16 --semantic-cache 50 --num-neighbors 5,5 --max-batches 50 \
    --output "$out/electronics_scale_minibatch55.json"
