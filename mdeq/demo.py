"""The embedded demo: train a DEQ classifier on scikit-learn's bundled 8x8 digits (no download).

Plain PyTorch (the Lightning training stack is issue #4); shows the core end to end: forward
solve, implicit backward, solver statistics and held-out accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mdeq.nn import DEQ, TanhCell


class DigitsDEQ(nn.Module):
    """Linear encoder -> DEQ(tanh cell, Jacobian-regularized) -> linear head."""

    def __init__(self, width: int = 128, solver: str = "anderson", tol: float = 1e-3, max_steps: int = 30) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, width)
        self.deq = DEQ(
            TanhCell(width, width, weight_scale=0.5),
            solver=solver,
            tol=tol,
            max_steps=max_steps,
            state_shape=(width,),
            jacobian_regularization="vjp",
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor, return_solution: bool = False):  # type: ignore[override]
        z, solution = self.deq(self.encoder(x))
        logits = self.head(z)
        return (logits, solution) if return_solution else logits


@dataclass
class DemoResult:
    test_accuracy: float
    seconds: float
    mean_nfe: float
    converged_fraction: float


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bundled digits, scaled to [0, 1], stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data / 16.0, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def run_demo(
    epochs: int = 40,
    solver: str = "anderson",
    seed: int = 0,
    batch_size: int = 64,
    jacobian_weight: float = 2.0,
    verbose: bool = True,
) -> DemoResult:
    """Train and evaluate; returns test accuracy and solver statistics."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    model = DigitsDEQ(solver=solver)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr))
        total, nfe = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            logits, sol = model(x_tr[idx], return_solution=True)
            loss = loss_fn(logits, y_tr[idx]) + jacobian_weight * sol.jacobian_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            nfe += sol.nfe
        sched.step()
        if verbose and (epoch % 5 == 4 or epoch == epochs - 1):
            print(f"epoch {epoch + 1:3d}/{epochs}  train loss {total / len(x_tr):.4f}  forward f-evals/batch {nfe / -(-len(x_tr) // batch_size):.1f}")
    model.eval()
    with torch.no_grad():
        logits, sol = model(x_te, return_solution=True)
    acc = float((logits.argmax(1) == y_te).float().mean())
    result = DemoResult(acc, time.perf_counter() - start, float(sol.nfe), sol.converged_fraction)
    if verbose:
        print(f"test accuracy {acc:.2%} on {len(y_te)} held-out digits; {sol.summary()}; {result.seconds:.1f}s")
    return result
