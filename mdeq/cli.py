"""The ``mdeq`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mdeq`` console script."""
    from mdeq.core import list_backwards, list_solvers

    parser = argparse.ArgumentParser(prog="mdeq", description="Deep equilibrium models for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a DEQ on the bundled 8x8 digits (no download) and report accuracy")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--solver", default="anderson", choices=list_solvers())
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("solvers", help="list the solvers and backward modes")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from mdeq.demo import run_demo

        run_demo(epochs=args.epochs, solver=args.solver, seed=args.seed)
        return 0
    if args.command == "solvers":
        print("solvers:  " + ", ".join(list_solvers()))
        print("backward: " + ", ".join(list_backwards()))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
