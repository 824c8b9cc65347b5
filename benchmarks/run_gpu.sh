#!/usr/bin/env bash
# The GPU benchmarks (section 5 of benchmarks/RESULTS.md): the side-by-side ones on CUDA, then
# benchmarks/gpu_path.py (host syncs, bf16 autocast, torch.compile, CUDA graphs, epoch time).
# Needs one CUDA GPU and TorchDEQ 0.1.0 (pip install -e ".[bench]"); about 10 minutes on an H100.
# Usage: bash benchmarks/run_gpu.sh   (output to stdout and benchmarks/out/<name>_cuda.md)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out
PY=${PYTHON:-python}
run() { local name=$1; shift; echo "== $name: python $*"; "$PY" "$@" | tee "out/${name}_cuda.md"; }
run gpu_path gpu_path.py --device cuda --batch 128
run torchdeq_forward torchdeq_forward.py --batch 32 --device cuda --repeats 5
run torchdeq_training torchdeq_training.py --batch 128 --device cuda
run memory memory.py --batch 32 --steps 10 30 100 --device cuda
run deq_overhead deq_overhead.py --batch 128 --device cuda
# CIFAR-10 epoch time, old path vs the GPU recipe (needs the data: MDEQ_DATA=/tmp/mdeq_data after tools/gpu/lease.py prepare)
if [ -n "${MDEQ_DATA:-}" ]; then run epoch_time epoch_time.py; else echo "== epoch_time: skipped (set MDEQ_DATA)"; fi
