#!/usr/bin/env bash
# Work on a lent GPU machine (the `device` tool): CIFAR-10 training runs and the GPU benchmarks.
# The machine starts bare (PyTorch, Lightning, timm, torchvision are there; jsonargparse, TorchDEQ
# and W&B are not) and keeps files only while calls follow each other. See tools/gpu/README.md.
#
#   bash tools/gpu/session.sh append              # add the carried .carry/cifar.part.* to the archive
#   bash tools/gpu/session.sh setup               # install .whl/*.whl, check the archive's SHA-256
#   bash tools/gpu/session.sh train NAME CONFIG [mdeq fit overrides...]   # in the background (setsid)
#   bash tools/gpu/session.sh status              # progress of the background runs, GPU use
#   bash tools/gpu/session.sh collect             # best/last checkpoints + logs -> $OUT
#   bash tools/gpu/session.sh bench               # benchmarks/run_gpu.sh -> $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=/tmp/mdeq_data
ARCHIVE=$DATA/CIFAR10/cifar-10-batches-py.tar.xz
SHA=2fada814d7b05af8913bef08e265cddd4cb4e8ce10c5392bdb96dbb995717e21   # ../shared/data/SHA256SUMS
RUNS=/tmp/mdeq_runs
PY=${PYTHON:-python3}
export PYTHONPATH=/tmp/site:$PWD MDEQ_DATA=$DATA MDEQ_CACHE=/tmp/mdeq_cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mdeq_out}

case "${1:-}" in
  append)
    mkdir -p "$(dirname "$ARCHIVE")"
    for part in .carry/cifar.part.*; do cat "$part" >> "$ARCHIVE"; echo "appended $part"; done
    ls -l "$ARCHIVE" ;;
  setup)
    if ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    if [ -f "$ARCHIVE" ]; then
      echo "$SHA  $ARCHIVE" | sha256sum -c -
    fi
    $PY -c "import torch, lightning, jsonargparse; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" ;;
  train)
    name=$2 config=$3; shift 3
    mkdir -p "$RUNS/$name"
    setsid nohup $PY -m mdeq.cli fit --config "$config" --trainer.default_root_dir "$RUNS/$name" \
      --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$RUNS/$name" \
      --data.init_args.num_workers 4 "$@" > "$RUNS/$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!), log $RUNS/$name.log" ;;
  status)
    for log in "$RUNS"/*.log; do
      [ -f "$log" ] || continue
      echo "== $log"; tr '\r' '\n' < "$log" | grep -E "Epoch|val/acc|Error|error" | tail -3
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null || true ;;
  collect)
    mkdir -p "$OUT"
    for dir in "$RUNS"/*/; do
      name=$(basename "$dir")
      best=$(find "$dir" -name 'best-*.ckpt' | sort | tail -1)
      [ -n "$best" ] && cp "$best" "$OUT/$name-$(basename "$best")"
      last=$(find "$dir" -name 'last.ckpt' | head -1)
      [ -n "$last" ] && cp "$last" "$OUT/$name-last.ckpt"
      final=$(find "$dir" -name 'final-*.ckpt' | sort | tail -1)   # the CPU configs' end-of-epoch weights
      [ -n "$final" ] && cp "$final" "$OUT/$name-$(basename "$final")"
      metrics=$(find "$dir" -name metrics.csv | head -1)
      [ -n "$metrics" ] && cp "$metrics" "$OUT/$name-metrics.csv"
      [ -f "$RUNS/$name.log" ] && tr '\r' '\n' < "$RUNS/$name.log" | tail -200 > "$OUT/$name.log"
    done
    ls -l "$OUT" ;;
  bench)
    mkdir -p "$OUT"
    PYTHON=$PY bash benchmarks/run_gpu.sh 2>&1 | tee "$OUT/bench_gpu.md" ;;
  *)
    sed -n 2,14p "$0"; exit 2 ;;
esac
