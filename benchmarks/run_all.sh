#!/usr/bin/env bash
# Run every benchmark with the settings recorded in benchmarks/RESULTS.md; output to stdout and
# to benchmarks/out/<name>.md. Needs the peers: pip install -e ".[bench]" (TorchDEQ, torchdiffeq).
# Usage: bash benchmarks/run_all.sh            (about 15 minutes on 2 CPU cores: measured 2026-12-06 as
# 11.5 min for the first four and part of the fifth, other work running, and 3.7 min for the last five)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out
run() { local name=$1; shift; echo "== $name: python $*"; python "$@" | tee "out/$name.md"; }
run torchdeq_forward torchdeq_forward.py --batch 32
run torchdeq_training torchdeq_training.py --batch 32
run memory memory.py --batch 8 --steps 10 30 100
run deq_overhead deq_overhead.py --batch 32
run solver_nfe solver_nfe.py --batch 8
run model_forward model_forward.py --batch 32
run ode_steady_state ode_steady_state.py --batch 16
run backward_linear_solvers backward_linear_solvers.py
run hard_maps hard_maps.py
