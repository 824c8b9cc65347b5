"""The GPU path (benchmark section 5): host synchronisations per training step, bf16 autocast,
torch.compile of the cell, CUDA-graph replay of a fixed-budget forward solve, and mdeq_tiny's
CIFAR-sized training throughput with the epoch time it implies.

Each part prints a markdown table. Parts:

- syncs: one mdeq_tiny training step (forward solve + implicit backward + AdamW) at two solver
  budgets. On CUDA the syncs are counted twice: the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` and the CUDA runtime's synchronising calls in a
  profiler trace. On CPU the host reads are counted with a dispatch mode (there they are free, and
  the solvers use them on purpose). The count must not grow with the budget.
- precision: training images/s in float32 and under bf16 autocast, at an equal fixed budget
  (tol 0, so both do the same number of f-evaluations).
- compile: training images/s with the cell eager and ``torch.compile``d (each mode in --compile-modes).
- graphs (CUDA only): a fixed-budget forward solve (``early_stop=False``: no host read) run
  eagerly vs captured once in a CUDA graph and replayed.
- inference: mdeq_tiny's whole inference forward with a fixed budget, eager vs
  ``torch.compile(fullgraph=True)`` (and, on CUDA, ``mode="reduce-overhead"``: CUDA graphs).
- epoch: training images/s of mdeq_tiny at the CIFAR-10 config's budget (at most 18 steps,
  rel. tol 1e-3) and the time of one 47,500-image epoch it implies; the real epoch time comes from
  ``mdeq fit --config configs/cifar10/mdeq_tiny.yaml`` (Lightning logs it).

Usage: python benchmarks/gpu_path.py --device cuda [--batch 128] [--parts syncs precision ...]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _common import describe_device, median_throughput, rows_to_markdown, synchronize, training_step_fn
from mdeq.core.solvers import get_solver
from mdeq.models import mdeq_tiny

PARTS = ("syncs", "precision", "compile", "graphs", "inference", "epoch")
TRAIN_IMAGES = 47_500  # CIFAR-10's training split less the 5% validation hold-out of the configs

aten = torch.ops.aten
_HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten._linalg_check_errors.default, aten.equal.default}
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ", "cudaMemcpy\t")


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _batch(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def _model(device: str, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    return mdeq_tiny(**{"on_divergence": "ignore", **kw}).train().to(device)


def _autocast_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def part_syncs(args: argparse.Namespace) -> str:
    x, y = _batch(args.batch, args.device)
    rows = []
    for steps in (10, 30):
        model = _model(args.device, tol=0.0, max_steps=steps)
        step = training_step_fn(model, x, y)
        step()  # warm-up
        synchronize()
        if args.device.startswith("cuda"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                    synchronize()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            debug = sum("synchroniz" in str(w.message).lower() for w in caught)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                synchronize()
            calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith(_SYNC_CALLS) or e.key.strip() in ("cudaMemcpy",)}
            # the final synchronize() of the measurement itself is one cudaDeviceSynchronize
            rows.append([steps, debug, sum(calls.values()), ", ".join(f"{k.strip()} {v}" for k, v in sorted(calls.items())) or "none"])
        else:
            with _HostReads() as mode:
                step()
            rows.append([steps, mode.count, "", "CPU: host reads are free; the solvers read flags on purpose"])
    header = ["solver steps (forward and backward)", "sync warnings (CUDA) / host reads (CPU)", "runtime sync calls", "detail"]
    return "### Host synchronisations per mdeq_tiny training step\n\n" + rows_to_markdown(header, rows)


def part_precision(args: argparse.Namespace) -> str:
    x, y = _batch(args.batch, args.device)
    bf16 = torch.bfloat16
    steps = {
        "float32": _autocast_step(_model(args.device, tol=0.0, max_steps=12), x, y, None),
        "bf16 autocast": _autocast_step(_model(args.device, tol=0.0, max_steps=12), x, y, bf16),
    }
    rates = median_throughput(steps, args.batch, args.steps, args.blocks)
    ref = rates["float32"]
    rows = [[k, f"{r:.1f}", f"{r / ref:.2f}x"] for k, r in rates.items()]
    return "### Precision (mdeq_tiny training, 12 forward + 12 backward steps)\n\n" + rows_to_markdown(["precision", "img/s", "vs float32"], rows)


def part_compile(args: argparse.Namespace) -> str:
    x, y = _batch(args.batch, args.device)
    rows = []
    eager = _model(args.device, tol=0.0, max_steps=12)
    steps: dict[str, Callable[[], None]] = {"eager": training_step_fn(eager, x, y)}
    compile_s: dict[str, str] = {"eager": ""}
    for mode in args.compile_modes:
        model = _model(args.device, tol=0.0, max_steps=12)
        model.deq.f = torch.compile(model.deq.f, mode=None if mode == "default" else mode)
        fn = training_step_fn(model, x, y)
        t = time.perf_counter()
        try:
            fn()
            fn()
            synchronize()
        except Exception as e:  # report, don't hide: a mode that fails is a result
            rows.append([f"compile ({mode})", "failed", "", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"])
            continue
        compile_s[f"compile ({mode})"] = f"{time.perf_counter() - t:.1f}"
        steps[f"compile ({mode})"] = fn
    rates = median_throughput(steps, args.batch, args.steps, args.blocks)
    ref = rates["eager"]
    rows = [[k, f"{r:.1f}", f"{r / ref:.2f}x", compile_s[k]] for k, r in rates.items()] + rows
    return "### torch.compile of the cell (mdeq_tiny training, 12 + 12 steps)\n\n" + rows_to_markdown(["cell", "img/s", "vs eager", "first two steps, s"], rows)


def part_graphs(args: argparse.Namespace) -> str:
    if not args.device.startswith("cuda"):
        return "### CUDA graphs\n\nskipped: needs --device cuda"
    rows = []
    for batch in sorted({32, args.batch}):
        model = _model(args.device)
        x, _ = _batch(batch, args.device)
        with torch.no_grad():
            inj = model.injection(model.stem(x))
            f, z0, _, _ = model.deq.flat_problem(inj, model.initial_state(inj))
        for solver_name in ("anderson", "broyden"):
            solver = get_solver(solver_name)

            def solve(z: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return solver.solve(f, z, tol=1e-3, max_steps=args.graph_steps, early_stop=False).z

            static_in = z0.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    solve(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = solve(static_in)

            def replay() -> torch.Tensor:
                static_in.copy_(z0)
                graph.replay()
                return static_out

            eager_t = _best(lambda: solve(z0), args.repeats)
            graph_t = _best(replay, args.repeats)
            err = float((replay() - solve(z0)).abs().max())
            rows.append([batch, solver_name, args.graph_steps, f"{eager_t * 1e3:.2f}", f"{graph_t * 1e3:.2f}", f"{eager_t / graph_t:.2f}x", f"{err:.1e}"])
    header = ["batch", "solver", "steps", "eager ms", "graph replay ms", "speed-up", "max |diff|"]
    return "### CUDA-graph replay of a fixed-budget forward solve (mdeq_tiny f)\n\n" + rows_to_markdown(header, rows)


def part_inference(args: argparse.Namespace) -> str:
    """mdeq_tiny inference with a fixed budget (early_stop=False: no host read), eager vs the
    whole forward compiled as one graph, and (CUDA) compiled with CUDA graphs."""
    x, _ = _batch(args.batch, args.device)
    model = _model(args.device, tol=1e-3, max_steps=args.graph_steps, extra={"early_stop": False, "check_input": False}).eval()
    modes = ["default"] + (["reduce-overhead"] if args.device.startswith("cuda") else [])
    rows = []
    with torch.no_grad():
        ref = model(x)
        eager_t = _best(lambda: model(x), args.repeats)
        rows.append(["eager", f"{eager_t * 1e3:.1f}", "1.00x", "", ""])
        for mode in modes:
            try:
                fn = torch.compile(model, fullgraph=True, mode=None if mode == "default" else mode)
                t = time.perf_counter()
                out = fn(x)
                fn(x)
                synchronize()
                first = time.perf_counter() - t
                best = _best(lambda: fn(x), args.repeats)
                err = float((out - ref).abs().max())
                rows.append([f"compile fullgraph ({mode})", f"{best * 1e3:.1f}", f"{eager_t / best:.2f}x", f"{first:.1f}", f"{err:.1e}"])
            except Exception as e:  # a mode that fails is a result
                rows.append([f"compile fullgraph ({mode})", "failed", "", "", f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"])
    header = ["forward", "ms per batch", "speed-up", "first two calls, s", "max |logit diff|"]
    return f"### mdeq_tiny inference, {args.graph_steps} Anderson steps, batch {args.batch}\n\n" + rows_to_markdown(header, rows)


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def part_epoch(args: argparse.Namespace) -> str:
    x, y = _batch(args.batch, args.device)
    rows = []
    for label, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        model = _model(args.device, tol=1e-3, max_steps=18)
        rate = median_throughput({label: _autocast_step(model, x, y, dtype)}, args.batch, args.steps, args.blocks)[label]
        rows.append([label, f"{rate:.1f}", f"{TRAIN_IMAGES / rate / 60:.1f}"])
    return (
        f"### mdeq_tiny CIFAR-10 training throughput (batch {args.batch}, at most 18 solver steps, rel. tol 1e-3)\n\n"
        + rows_to_markdown(["precision", "img/s", "epoch of 47,500 images, min"], rows)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--graph-steps", type=int, default=20)
    p.add_argument("--compile-modes", nargs="+", default=["default", "max-autotune-no-cudagraphs"])
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print(f"GPU path benchmarks: torch {torch.__version__}, {describe_device(args.device)}, batch {args.batch}\n", flush=True)
    for part in args.parts:
        try:
            print(globals()[f"part_{part}"](args) + "\n", flush=True)
        except Exception as e:  # one part failing (e.g. a capture the driver refuses) is a result too
            print(f"### {part}\n\nfailed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n", flush=True)


if __name__ == "__main__":
    main()
