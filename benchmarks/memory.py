"""Peak memory of one training step vs the number of solver steps: implicit backward (should
stay flat), unrolled backprop through the solver (grows), and an explicit weight-untied network
of the same depth (grows, and carries depth x the parameters).

Model: mdeq_tiny (CIFAR-sized input). For ``--steps 10 30 100`` the forward runs exactly that
many fixed-point steps (tol 0, so no early stop). Each measurement runs in a fresh subprocess:
on CPU the peak is the growth of the process's peak resident memory (ru_maxrss) during one
forward + backward; on CUDA it is torch.cuda.max_memory_allocated. The bytes autograd saves for
the backward pass (unique storages, via saved-tensor hooks) are reported too: they are exact and
machine-independent.

Usage: python benchmarks/memory.py [--batch 8] [--steps 10 30 100] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import warnings

import torch
from torch import nn

from _common import rows_to_markdown
from mdeq.models import mdeq_tiny

MODES = ("implicit", "unrolled", "explicit")


class WeightUntied(nn.Module):
    """``depth`` independent copies of mdeq_tiny's f applied in sequence (an explicit network)."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model = model
        self.layers = nn.ModuleList(copy.deepcopy(model.deq.f) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        inj = m.injection(m.stem(x))
        z = m.initial_state(inj)
        for f in self.layers:
            z = f(z, inj)
        return m.head(z)


def worker(mode: str, steps: int, batch: int, device: str) -> dict[str, float]:
    warnings.simplefilter("ignore")  # tol 0 never "converges": that is the point here
    torch.manual_seed(0)
    dev = torch.device(device)
    base = mdeq_tiny(solver="fixed_point", tol=0.0, max_steps=steps, backward="implicit")
    if mode == "implicit":
        model: nn.Module = base
        run = lambda x: model(x)  # noqa: E731
    elif mode == "unrolled":
        model = base
        run = lambda x: model(x, unroll=steps)  # noqa: E731
    else:
        model = WeightUntied(base, steps)
        run = model
    model = model.to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(run(x), y)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_mb": peak / 2**20, "saved_mb": sum(saved.values()) / 2**20, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.batch, args.device)))
        return
    results: dict[tuple[str, int], dict[str, float]] = {}
    for mode in args.modes:
        for k in args.steps:
            cmd = [sys.executable, __file__, "--worker", mode, str(k), "--batch", str(args.batch), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode, k] = json.loads(out)
            r = results[mode, k]
            print(f"{mode} {k}: peak {r['peak_mb']:.1f} MB, saved {r['saved_mb']:.1f} MB, params {r['params']:,}", flush=True)
    header = ["mode", "params"] + [f"peak MB @ {k}" for k in args.steps] + [f"saved MB @ {k}" for k in args.steps] + [f"peak growth {args.steps[0]}->{args.steps[-1]}"]
    rows = []
    for mode in args.modes:
        rs = [results[mode, k] for k in args.steps]
        growth = rs[-1]["peak_mb"] / rs[0]["peak_mb"] - 1 if rs[0]["peak_mb"] > 0 else float("nan")
        rows.append([mode, f"{int(rs[-1]['params']):,}"] + [f"{r['peak_mb']:.1f}" for r in rs] + [f"{r['saved_mb']:.1f}" for r in rs] + [f"{growth:+.0%}"])
    print(f"\nPeak memory of one mdeq_tiny training step (batch {args.batch}, device {args.device}, torch {torch.__version__})\n")
    print(rows_to_markdown(header, rows))


if __name__ == "__main__":
    main()
