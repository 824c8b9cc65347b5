"""Continuous vs discrete solvers on the named models' cells at initialisation (issue #6).

For each model's equilibrium map f (conv_deq_small, mdeq_tiny; seed 0, train mode, CIFAR-sized
random batch): f-evaluations and wall time for anderson / broyden / fixed_point / ode (ours)
to reach a relative residual of 1e-3, and the naive neural-ODE route: torchdiffeq's odeint of
dz/dt = f(z) - z to a fixed long end time T (no steady-state test), with its final residual.

Usage: python benchmarks/ode_steady_state.py [--batch 16] [--tol 1e-3] [--T 20]
(torchdiffeq is optional: pip install torchdiffeq)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from mdeq import models
from mdeq.core.packing import StatePacker
from mdeq.core.solvers import get_solver


def equilibrium_map(name: str, batch: int):
    torch.manual_seed(0)
    model = getattr(models, name)().train()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        inj = model.stem(x)
        if hasattr(model, "injection"):
            inj = model.injection(inj)
            z0 = model.initial_state(inj)
        else:
            z0 = torch.zeros_like(inj)
    packer = StatePacker.from_state(z0)
    deq = model.deq

    def f(z: torch.Tensor) -> torch.Tensor:
        return packer.pack(deq.f(packer.unpack(z), inj))

    return f, packer.pack(z0)


def residual(f, z: torch.Tensor) -> float:
    fz = f(z)
    return float(((fz - z).norm(dim=1) / fz.norm(dim=1)).max())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--T", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=400)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print(f"| model | solver | f-evals | max rel. residual | converged | wall s |  (batch {args.batch}, tol {args.tol:g}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|---|")
    for name in ("conv_deq_small", "mdeq_tiny"):
        f, z0 = equilibrium_map(name, args.batch)
        with torch.no_grad():
            get_solver("anderson").solve(f, z0, tol=1e-1, max_steps=3)  # warm-up
            for solver in ("anderson", "broyden", "fixed_point", "ode"):
                t = time.perf_counter()
                r = get_solver(solver).solve(f, z0, tol=args.tol, max_steps=args.max_steps)
                dt = time.perf_counter() - t
                print(f"| {name} | {solver} | {r.nfe} | {float(r.residual.max()):.2e} | {float(r.converged.float().mean()):.0%} | {dt:.2f} |")
            try:
                from torchdiffeq import odeint
            except ImportError:
                print(f"| {name} | torchdiffeq odeint to T={args.T:g} | (torchdiffeq not installed) | | | |")
                continue
            count = [0]

            def rhs(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                count[0] += 1
                return f(z) - z

            t = time.perf_counter()
            zt = odeint(rhs, z0, torch.tensor([0.0, args.T]), rtol=args.tol, atol=1e-6, method="dopri5")[-1]
            dt = time.perf_counter() - t
            res = residual(f, zt)
            print(f"| {name} | torchdiffeq dopri5 to T={args.T:g} | {count[0]} | {res:.2e} | {'100%' if res <= args.tol else '-'} | {dt:.2f} |")


if __name__ == "__main__":
    main()
