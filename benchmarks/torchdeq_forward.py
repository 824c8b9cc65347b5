"""Forward solve, side by side with TorchDEQ: the same f, the same initial guess, the same
relative tolerance, in one process.

For each problem (the tutorial's 48-channel conv cell; mdeq_tiny's f) and tolerance, each
solver pair runs alternately (best of N wall time). Reported per library: batched f-evaluations,
the max over the batch of ||f(z)-z|| / ||f(z)|| of the returned point (one yardstick for both),
and the time ratio ours / TorchDEQ's. Both stop when every sample is below tol (TorchDEQ checks
the batch max; ours stops samples individually and ends when all are done).

Usage: python benchmarks/torchdeq_forward.py [--batch 32] [--tols 1e-3 1e-5] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from _common import conv_cell_problem, Counted, describe_device, interleaved, mdeq_tiny_problem, relative_residual, require_torchdeq, rows_to_markdown
from mdeq.core.solvers import get_solver

# ours -> TorchDEQ's name for the same method
PAIRS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5])
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--problems", nargs="+", default=["conv", "mdeq_tiny"], choices=["conv", "mdeq_tiny"])
    p.add_argument("--solvers", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    require_torchdeq()
    from torchdeq.solver import get_solver as peer_solver

    header = ["problem", "solver", "tol", "f-evals ours / peer", "max rel. residual ours / peer", "s ours / peer", "time ratio"]
    rows = []
    for problem in args.problems:
        make = conv_cell_problem if problem == "conv" else mdeq_tiny_problem
        f, z0, label = make(args.batch, device=args.device)
        with torch.no_grad():  # warm-up: allocations, kernel selection
            get_solver("anderson").solve(f, z0, tol=1e-2, max_steps=5)
        for tol in args.tols:
            for ours, theirs in ((k, PAIRS[k]) for k in args.solvers):
                ours_f, peer_f = Counted(f), Counted(f)
                counts = {}

                def run_ours() -> torch.Tensor:
                    ours_f.calls = 0
                    with torch.no_grad():
                        r = get_solver(ours).solve(ours_f, z0, tol=tol, max_steps=args.max_steps, stop_mode="rel")
                    counts["ours"] = ours_f.calls
                    return r.z

                def run_peer() -> torch.Tensor:
                    peer_f.calls = 0
                    with torch.no_grad():
                        z, _, _ = peer_solver(theirs)(peer_f, z0, max_iter=args.max_steps, tol=tol, stop_mode="rel")
                    counts["peer"] = peer_f.calls
                    return z

                res = interleaved({"ours": run_ours, "peer": run_peer}, args.repeats)
                (t_o, z_o), (t_p, z_p) = res["ours"], res["peer"]
                r_o, r_p = float(relative_residual(f, z_o).max()), float(relative_residual(f, z_p).max())
                rows.append([label, ours, f"{tol:g}", f"{counts['ours']} / {counts['peer']}", f"{r_o:.2e} / {r_p:.2e}", f"{t_o:.3f} / {t_p:.3f}", f"{t_o / t_p:.2f}x"])
                print(" | ".join(rows[-1]), flush=True)
    print(f"\nForward solve vs TorchDEQ (torch {torch.__version__}, {describe_device(args.device)}, best of {args.repeats})\n")
    print(rows_to_markdown(header, rows))


if __name__ == "__main__":
    main()
