"""The ConvergenceGuard callback stops a destabilised run with its message, never trains on NaN."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from mdeq import DEQ, TanhCell
from mdeq.lightning import ClassificationModule, ConvergenceGuard, DigitsDataModule


class Backbone(nn.Module):
    def __init__(self, solver="fixed_point"):
        super().__init__()
        self.enc = nn.Linear(64, 32)
        self.deq = DEQ(TanhCell(32, 32, weight_scale=0.5), solver=solver, tol=1e-4, max_steps=15, state_shape=(32,), on_divergence="ignore")
        self.head = nn.Linear(32, 10)
        self.poison = False

    def forward(self, x, return_solution=False):
        z, sol = self.deq(self.enc(x.flatten(1)))
        logits = self.head(z) * (float("nan") if self.poison else 1.0)
        return (logits, sol) if return_solution else logits


class Sabotage(pl.Callback):
    def __init__(self, at_step, what):
        self.at_step, self.what = at_step, what

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            if self.what == "destabilise":
                with torch.no_grad():
                    module.backbone.deq.f.linear_z.weight.mul_(10.0)
            else:
                module.backbone.poison = True


def run(guard, sabotage, max_steps=200):
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(backbone=Backbone(), lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[guard, sabotage],
    )
    with pytest.warns(Warning):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return trainer, module


def test_guard_escalates_then_stops_a_run_that_lost_its_equilibrium():
    guard = ConvergenceGuard(min_converged_fraction=0.5, window=5)
    trainer, module = run(guard, Sabotage(10, "destabilise"))
    assert guard.events[:3] == ["warn", "increase_jacobian(0.5)", "stop"]
    assert "losing its equilibrium" in guard.stopped_reason and "mdeq doctor" in guard.stopped_reason
    assert trainer.global_step < 60
    assert module.jacobian.weight == 0.5
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_never_steps_on_nan():
    guard = ConvergenceGuard(window=5)
    trainer, module = run(guard, Sabotage(4, "poison"))
    assert "non-finite gradients" in guard.stopped_reason or "loss became nan" in guard.stopped_reason
    assert trainer.global_step <= 6
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_is_quiet_on_a_healthy_run():
    pl.seed_everything(0, verbose=False)
    guard = ConvergenceGuard(window=5)
    module = ClassificationModule(backbone=Backbone(solver="anderson"), lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[guard])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert guard.events == [] and guard.stopped_reason is None and trainer.global_step == 20


def test_guard_rejects_unknown_actions():
    with pytest.raises(ValueError, match="unknown guard action"):
        ConvergenceGuard(actions=("warn", "panic"))
    for bad in (-1, 2.5, "500"):
        with pytest.raises(ValueError, match="stability_every_n_steps must be an integer >= 0"):
            ConvergenceGuard(stability_every_n_steps=bad)


def test_guard_tolerates_a_tight_training_budget():
    """Samples stopped by a small step budget just short of tol (within near_factor x tol) are a
    normal training regime, not a lost equilibrium: no escalation."""
    pl.seed_everything(0, verbose=False)
    guard = ConvergenceGuard(window=5)
    backbone = Backbone()
    backbone.deq.max_steps = 7  # residuals 1e-4..4e-4 for tol 1e-4: none converged, all near
    module = ClassificationModule(backbone=backbone, lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[guard])
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(module, datamodule=dm)
    x, _ = next(iter(dm.train_dataloader()))
    _, sol = backbone(x, return_solution=True)
    assert not bool(sol.converged.any()) and float((sol.residual < 10 * sol.tol).float().mean()) > 0.5
    assert guard.events == [] and trainer.global_step == 30


def test_guard_warns_once_when_samples_come_near_but_never_reach_tol():
    """Budget-bound training (residual a few times tol, never at it) is not "losing the equilibrium"
    (no escalation), but the guard says once that the model may learn the truncated iteration."""
    from types import SimpleNamespace

    from mdeq.core.errors import ConvergenceWarning

    guard = ConvergenceGuard(window=5, budget_window=20)
    near_only = SimpleNamespace(solver="anderson", residual=torch.full((8,), 0.05), tol=0.02, converged=torch.zeros(8, dtype=torch.bool),
                                diverged=torch.zeros(8, dtype=torch.bool), nfe=15)
    module = SimpleNamespace(_last_solution=near_only)
    trainer = SimpleNamespace(global_step=0, should_stop=False)
    with pytest.warns(ConvergenceWarning, match="truncated iteration") as record:
        for step in range(60):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, step)
    assert guard.events == ["budget_warning"] and len(record) == 1 and not trainer.should_stop
    assert "2.5x tol" in str(record[0].message)
    state = guard.state_dict()
    fresh = ConvergenceGuard(window=5, budget_window=20)
    fresh.load_state_dict(state)
    assert fresh.budget_level == 1  # a resumed run does not repeat it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(60, 100):
            fresh.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, step)
    assert fresh.events == ["budget_warning"]
    # samples that do reach tol: no warning
    quiet = ConvergenceGuard(window=5, budget_window=20)
    module.converged_ok = near_only.converged = torch.ones(8, dtype=torch.bool)
    for step in range(60):
        quiet.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, step)
    assert quiet.events == []


def test_guard_raises_the_jacobian_weight_while_samples_do_not_reach_tol():
    """budget_actions=("warn", "increase_jacobian"): warn, then double the Jacobian weight every
    failing window (a fresh window each time) up to max_jacobian_weight, then stay put; never stop."""
    from types import SimpleNamespace

    from mdeq.core.errors import ConvergenceWarning
    from mdeq.lightning.recipes import JacobianSchedule

    guard = ConvergenceGuard(window=5, budget_window=10, budget_actions=("warn", "increase_jacobian"), max_jacobian_weight=2.0)
    near_only = SimpleNamespace(solver="anderson", residual=torch.full((8,), 0.05), tol=0.02, converged=torch.zeros(8, dtype=torch.bool),
                                diverged=torch.zeros(8, dtype=torch.bool), nfe=15)
    module = SimpleNamespace(_last_solution=near_only, jacobian=JacobianSchedule(0.5, 0.3, 0.0, 100, 0))
    trainer = SimpleNamespace(global_step=0, should_stop=False)
    with pytest.warns(ConvergenceWarning) as record:
        for step in range(70):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, step)
    assert guard.events == ["budget_warning", "increase_jacobian(1)", "increase_jacobian(2)"]
    assert module.jacobian.weight == 2.0 and module.jacobian.warmup_steps == 0 and not trainer.should_stop
    assert "Raising the Jacobian-regularization weight to 2" in str(record[-1].message)
    # once the samples reach tol, no further action
    near_only.converged = torch.ones(8, dtype=torch.bool)
    guard.max_jacobian_weight = 8.0
    for step in range(70, 100):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, step)
    assert module.jacobian.weight == 2.0 and len(guard.events) == 3
    # a resumed run (fresh module from the config's weight 0.5) gets the raised weight back
    resumed = ConvergenceGuard(budget_actions=("warn", "increase_jacobian"))
    resumed.load_state_dict(guard.state_dict())
    fresh_module = SimpleNamespace(jacobian=JacobianSchedule(0.5, 0.3, 0.0, 100, 0))
    resumed.on_train_start(trainer, fresh_module)
    assert fresh_module.jacobian.weight == 2.0 and fresh_module.jacobian.warmup_steps == 0
    with pytest.raises(ValueError, match="unknown guard action"):
        ConvergenceGuard(budget_actions=("warn", "retrain"))


class UnrollableBackbone(Backbone):
    def forward(self, x, return_solution=False, unroll=None):
        z, sol = self.deq(self.enc(x.flatten(1)), unroll=unroll)
        logits = self.head(z)
        return (logits, sol) if return_solution else logits


def test_guard_ignores_the_unrolled_warm_up():
    """pretrain_steps run N plain iterations, not a solve to tol: samples short of tol there are
    not a lost equilibrium, and not a budget miss. Before, the guard stopped such runs at the end
    of its third window."""
    pl.seed_everything(0, verbose=False)
    guard = ConvergenceGuard(window=5, budget_window=5, budget_actions=("warn", "increase_jacobian"))
    module = ClassificationModule(backbone=UnrollableBackbone(solver="anderson"), lr=1e-3, scheduler="constant", pretrain_steps=25, pretrain_unroll=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[guard])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert guard.events == [] and guard.stopped_reason is None and trainer.global_step == 30
    assert module.jacobian.weight == 0.0


class RepellingCell(nn.Module):
    """f(z, x) = A z + x + b with a fixed symmetric A of spectral radius 1.2 (80 dimensions): root
    finders converge to its root, which plain iteration runs away from."""

    def __init__(self, dim=80):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        spectrum = torch.cat([torch.tensor([1.2]), 0.3 * torch.rand(dim - 1, generator=g)])
        self.register_buffer("a", q @ torch.diag(spectrum) @ q.T)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, z, x):
        return z @ self.a.T + x + self.b


class RepellingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 80)
        self.deq = DEQ(RepellingCell(), solver="newton_krylov", tol=1e-5, max_steps=30, state_shape=(80,))
        self.head = nn.Linear(80, 10)

    def forward(self, x, return_solution=False):
        z, sol = self.deq(self.enc(x.flatten(1)))
        logits = self.head(z)
        return (logits, sol) if return_solution else logits


def test_guard_checks_the_stability_of_large_states_periodically():
    from mdeq.core.stability import StabilityWarning

    pl.seed_everything(0, verbose=False)
    guard = ConvergenceGuard(window=5, stability_every_n_steps=2)
    module = ClassificationModule(backbone=RepellingBackbone(), lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[guard])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    stability = [w for w in caught if issubclass(w.category, StabilityWarning)]
    assert len(stability) == 1 and "df/dz at z* has spectral radius 1.2" in str(stability[0].message)
    assert float(trainer.callback_metrics["stability/spectral_radius"]) == pytest.approx(1.2, rel=1e-3)
    layer = module.backbone.deq
    assert layer.stability_forwards == 0  # 80 dimensions: never checked by the layer on its own
    # without the guard's requests, a state this large is not checked at all
    quiet = ClassificationModule(backbone=RepellingBackbone(), lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[ConvergenceGuard(stability_every_n_steps=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(quiet, datamodule=DigitsDataModule(batch_size=32))
    assert not [w for w in caught if issubclass(w.category, StabilityWarning)] and quiet.backbone.deq.last_stability is None


def test_a_users_own_layer_settings_survive_training_the_guard_and_evaluation():
    """Budgets go with the calls: a tol, max_steps and Jacobian setting the user put on the layer
    are what the layer holds after training with other phase budgets and a Jacobian schedule,
    after the guard escalated, and after an evaluation at yet another budget."""
    from mdeq.core.budget import SolverBudget
    from mdeq.evaluation import evaluate

    pl.seed_everything(0, verbose=False)
    backbone = Backbone()
    deq = backbone.deq
    deq.tol, deq.max_steps = 3e-4, 17  # the user's own choice, after construction
    own_jacobian = deq.jacobian_regularization
    seen = []
    deq.register_forward_pre_hook(lambda layer, args: seen.append(layer.budget_for_call()[:2]))
    module = ClassificationModule(
        backbone=backbone, lr=1e-3, scheduler="constant", train_max_steps=3, train_tol=1e-7, eval_max_steps=9, eval_tol=1e-3,
        jacobian_weight=0.5,
    )
    # 3 steps to tol 1e-7: no sample comes near, so the guard warns and raises the Jacobian weight
    guard = ConvergenceGuard(min_converged_fraction=0.99, window=3, actions=("warn", "increase_jacobian"), stability_every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=6, callbacks=[guard],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert (3, 1e-7) in seen and (9, 1e-3) in seen  # the phase budgets did reach the layer
    assert "warn" in guard.events and any(e.startswith("increase_jacobian(") for e in guard.events)  # the guard acted
    flat = (torch.randn(40, 64), torch.randint(0, 10, (40,)))
    m = evaluate(backbone, flat, SolverBudget(max_steps=2, tol=1e-1))
    assert seen[-1] == (2, 1e-1) and m.nfe <= 3
    assert (deq.tol, deq.max_steps) == (3e-4, 17) and deq.jacobian_regularization is own_jacobian
    assert deq.budget_for_call()[:2] == (17, 3e-4)


# ---- check_every_n_steps: the steps in between read nothing on the host -------------------------


def test_guard_reading_every_n_steps_still_escalates_and_stops():
    guard = ConvergenceGuard(min_converged_fraction=0.5, window=5, check_every_n_steps=5)
    assert guard.recent.maxlen == 1  # a window of 5 steps is one read of 5 steps
    trainer, module = run(guard, Sabotage(10, "destabilise"))
    assert guard.events[:3] == ["warn", "increase_jacobian(0.5)", "stop"]
    assert trainer.global_step % 5 == 0 and trainer.global_step < 80  # decisions fall on read steps
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_reading_every_n_steps_zeroes_nonfinite_gradients_and_stops_at_the_next_read():
    guard = ConvergenceGuard(window=5, check_every_n_steps=4)
    trainer, module = run(guard, Sabotage(5, "poison"))
    assert "non-finite gradients" in guard.stopped_reason and "a non-finite loss" in guard.stopped_reason
    assert "in 3 of the last 4 steps" in guard.stopped_reason  # steps 6, 7, 8 poisoned; read at step 8
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())  # zeroed gradients: the weights stay finite


def test_guard_reading_every_n_steps_reads_the_host_only_on_read_steps(monkeypatch: pytest.MonkeyPatch):
    from tests.core.test_host_syncs import HostReads

    reads: list[int] = []
    sums_read = []  # the guard's one read of its sums (.tolist() of a CPU tensor bypasses the dispatcher)
    all_ranks = ConvergenceGuard._all_ranks
    monkeypatch.setattr(ConvergenceGuard, "_all_ranks", staticmethod(lambda t, local: sums_read.append(1) or all_ranks(t, local)))

    class Count(pl.Callback):  # the guard's hooks of each step, under the counter
        def __init__(self, guard):
            self.guard = guard

        def on_before_optimizer_step(self, trainer, module, optimizer):
            before = len(sums_read)
            with HostReads() as mode:
                self.guard.on_before_optimizer_step(trainer, module, optimizer)
            self.n = mode.count + len(sums_read) - before

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            before = len(sums_read)
            with HostReads() as mode:
                self.guard.on_train_batch_end(trainer, module, outputs, batch, batch_idx)
            reads.append(self.n + mode.count + len(sums_read) - before)

    guard = ConvergenceGuard(window=6, check_every_n_steps=3, stability_every_n_steps=0)
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(backbone=Backbone(solver="anderson"), lr=1e-3, scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Count(guard)])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert [r > 0 for r in reads] == [False, False, True] * 3, reads
    assert len(guard.recent) == 2 and guard.events == []  # two reads of 3 steps fill the 6-step window
    every_step = ConvergenceGuard(window=6, stability_every_n_steps=0)  # the default reads at every step
    reads.clear()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Count(every_step)])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert all(r > 0 for r in reads) and len(reads) == 3


def test_guard_rejects_a_bad_read_interval():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="check_every_n_steps"):
            ConvergenceGuard(check_every_n_steps=bad)
