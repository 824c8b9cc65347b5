"""Training step throughput, side by side with TorchDEQ, on mdeq_tiny with CIFAR-sized batches.

Both models share the same stem, equilibrium map f and head (deep copies of one initialisation);
only the DEQ layer differs: ours (mdeq.DEQ) vs TorchDEQ's ``get_deq``. One step = forward solve +
backward + AdamW step, on a fixed random batch (throughput does not depend on the labels).
Like is compared with like:

- implicit: our implicit backward vs TorchDEQ's ``ift=True``; both Anderson forward and backward,
  relative tolerance 1e-3 forward and backward, at most 30 steps each;
- phantom: our ``PhantomBackward(steps=5, damping=0.5)`` vs TorchDEQ's ``grad=5, tau=0.5``.

Steps alternate between the two models in blocks; reported are images/second (median block)
and the ratio ours / TorchDEQ's.

Usage: python benchmarks/torchdeq_training.py [--batch 32] [--steps 6] [--blocks 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from _common import TorchDEQClassifier, describe_device, median_throughput, require_torchdeq, rows_to_markdown, training_step_fn
from mdeq.core.backward import ImplicitBackward, PhantomBackward
from mdeq.models import mdeq_tiny

SETTINGS = {
    "implicit": (
        dict(backward=ImplicitBackward(solver="anderson", tol=1e-3, max_steps=30)),
        dict(f_solver="anderson", b_solver="anderson", f_max_iter=30, b_max_iter=30, f_tol=1e-3, b_tol=1e-3, f_stop_mode="rel", b_stop_mode="rel", ift=True),
    ),
    "phantom": (
        dict(backward=PhantomBackward(steps=5, damping=0.5)),
        dict(f_solver="anderson", f_max_iter=30, f_tol=1e-3, f_stop_mode="rel", grad=5, tau=0.5),
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="training steps per timed block")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks per model (alternating)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    require_torchdeq()
    warnings.simplefilter("ignore")  # non-convergence warnings at init are expected and equal for both
    header = ["backward", "ours img/s", "TorchDEQ img/s", "ratio (ours / TorchDEQ)", "ours f-evals fwd"]
    rows = []
    for name in args.settings:
        ours_kw, peer_kw = SETTINGS[name]
        torch.manual_seed(args.seed)
        ours = mdeq_tiny(max_steps=30, tol=1e-3, solver="anderson", **ours_kw).train().to(args.device)
        peer = TorchDEQClassifier(ours, **peer_kw).train().to(args.device)
        x = torch.randn(args.batch, 3, 32, 32, device=args.device)
        y = torch.randint(0, 10, (args.batch,), device=args.device)
        steps = {"ours": training_step_fn(ours, x, y), "peer": training_step_fn(peer, x, y)}
        rates = median_throughput(steps, args.batch, args.steps, args.blocks)
        with torch.no_grad():
            _, sol = ours(x, return_solution=True)
        r_o, r_p = rates["ours"], rates["peer"]
        rows.append([name, f"{r_o:.1f}", f"{r_p:.1f}", f"{r_o / r_p:.2f}x", sol.nfe])
        print(" | ".join(map(str, rows[-1])), flush=True)
    print(f"\nmdeq_tiny training step vs TorchDEQ (batch {args.batch}, torch {torch.__version__}, {describe_device(args.device)})\n")
    print(rows_to_markdown(header, rows))


if __name__ == "__main__":
    main()
