"""A training guard: notices when a DEQ has lost its equilibrium and acts before it trains on NaN."""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from mdeq.core.errors import ADVICE, ConvergenceWarning

ACTIONS = ("warn", "increase_jacobian", "stop")


class ConvergenceGuard(pl.Callback):
    """Watches every training step's solution (fraction converged, diverged samples) and the
    loss and gradients.

    - A non-finite loss or gradient: the optimizer step is skipped (gradients dropped) and
      training stops with a message; the weights stay finite.
    - When the mean fraction of samples *near* equilibrium (relative residual within
      ``near_factor`` times the solver tolerance, not diverged; and the implicit backward's residual
      too, where there is one) over the last ``window`` steps
      falls below ``min_converged_fraction``, the guard escalates through ``actions``: "warn" (a
      ``ConvergenceWarning`` with advice), "increase_jacobian" (multiply the module's Jacobian
      weight by ``jacobian_factor``, from ``initial_jacobian_weight`` if it was 0, up to
      ``max_jacobian_weight``), and "stop" (end training with a message). Each escalation waits
      for a fresh window.

    - When, over the last ``budget_window`` steps, fewer than ``min_converged_fraction`` of the
      samples reached the tolerance itself (even if they came near it), the network may be
      learning the truncated iteration rather than an equilibrium. Such a model loses accuracy
      when evaluated with more solver steps (:mod:`mdeq.equilibrium_check` measures it). The guard then goes
      through ``budget_actions``, one per failing window: "warn" (once), "increase_jacobian" (as
      above; when it is the last action it repeats every failing window until
      ``max_jacobian_weight``), "stop". The default only warns.

    - Every ``stability_every_n_steps`` training steps (0: never) the guard asks each DEQ layer
      to check, on that step's forward, that its equilibrium attracts plain iteration (spectral
      radius of df/dz at z* below 1, from a few Jacobian-vector products on up to 8 samples; see
      :mod:`mdeq.core.stability`). Layers with small states check themselves on their own cadence;
      this covers the large ones. A repelling equilibrium is reported once per layer (a
      ``StabilityWarning`` with the fixes), and the largest spectral radius seen is logged as
      ``stability/spectral_radius``.

    - ``check_every_n_steps`` (default 1): how often the guard reads its statistics on the host.
      Each read waits for the device (a CUDA synchronisation). With N > 1 the steps in between
      read nothing: the per-step counts are summed on the device, a step whose gradients are
      not finite has them zeroed there (the optimizer's step then leaves the weights finite), and
      every N-th step reads the sums once, decides as above over the N steps (windows are still
      counted in steps) and stops training if any of them had a non-finite loss or gradient (the
      end of an epoch and of training also check for such steps).

    ``stopped_reason`` holds the message when the guard stopped training.
    """

    def __init__(
        self,
        min_converged_fraction: float = 0.5,
        window: int = 50,
        near_factor: float = 10.0,
        actions: tuple[str, ...] = ("warn", "increase_jacobian", "stop"),
        jacobian_factor: float = 2.0,
        initial_jacobian_weight: float = 0.5,
        max_jacobian_weight: float = 10.0,
        budget_window: int = 200,
        budget_actions: tuple[str, ...] = ("warn",),
        stability_every_n_steps: int = 500,
        check_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if not (isinstance(check_every_n_steps, int) and not isinstance(check_every_n_steps, bool) and check_every_n_steps >= 1):
            raise ValueError(f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        self.check_every_n_steps = check_every_n_steps
        self._pending: torch.Tensor | None = None  # device sums since the last read: bad loss, bad grads, near, reached, samples
        self._pending_steps = 0
        self._bad_grads: torch.Tensor | None = None  # device count of zeroed non-finite-gradient steps
        self._pending_solution: Any = None  # the last solving step's solution (its tol, residuals for messages)
        if not (isinstance(stability_every_n_steps, int) and stability_every_n_steps >= 0):
            raise ValueError(f"stability_every_n_steps must be an integer >= 0, got {stability_every_n_steps!r}")
        self.stability_every_n_steps = stability_every_n_steps
        self.stability_pending = False
        bad = [a for a in (*actions, *budget_actions) if a not in ACTIONS]
        if bad:
            raise ValueError(f"unknown guard action(s) {bad}; choose from {ACTIONS}")
        if not 0.0 < min_converged_fraction <= 1.0:
            raise ValueError(f"min_converged_fraction must be in (0, 1], got {min_converged_fraction}")
        self.min_converged_fraction = min_converged_fraction
        self.window = window
        if not near_factor >= 1.0:
            raise ValueError(f"near_factor must be >= 1, got {near_factor}")
        self.near_factor = near_factor
        self.actions = tuple(actions)
        self.jacobian_factor = jacobian_factor
        self.initial_jacobian_weight = initial_jacobian_weight
        self.max_jacobian_weight = max_jacobian_weight
        self.recent: deque[float] = deque(maxlen=self._checks(window))  # one entry per read (N steps)
        self.budget_window = budget_window
        self.reached: deque[float] = deque(maxlen=self._checks(budget_window))  # fraction at tol itself, per read
        self.budget_actions = tuple(budget_actions)
        self.budget_level = 0
        self.jacobian_weight: float | None = None  # the weight this guard set, re-applied on resume
        self.level = 0
        self.stopped_reason: str | None = None
        self.events: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run gets back the Jacobian weight the guard had raised (the module's own
        hyperparameters only hold the configured one)."""
        schedule = getattr(pl_module, "jacobian", None)
        if self.jacobian_weight is not None and schedule is not None:
            schedule.weight, schedule.warmup_steps = self.jacobian_weight, 0

    def _checks(self, steps: int) -> int:
        """A window of ``steps`` training steps, in reads (each covers ``check_every_n_steps``)."""
        return max(1, -(-steps // self.check_every_n_steps))

    def _reads_now(self, trainer: pl.Trainer) -> bool:
        """Whether this step's statistics are read on the host: every ``check_every_n_steps``-th step."""
        n = self.check_every_n_steps
        return n == 1 or trainer.global_step % n == 0  # (global_step already counts this step)

    # ---- the stability of the equilibrium ----------------------------------------------------------
    def _stability_step(self, trainer: pl.Trainer) -> bool:
        n = self.stability_every_n_steps
        return n > 0 and trainer.global_step % n == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.stability_pending = self._stability_step(trainer)
        if self.stability_pending:
            for layer in _deq_layers(pl_module):
                if layer.stability != "never":
                    layer.request_stability_check()

    def _log_stability(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        radii = [layer.last_stability.spectral_radius for layer in _deq_layers(pl_module) if layer.last_stability is not None]
        radii = [r for r in radii if r.numel()]
        if radii:  # the same layers check on every rank: the reduction is collective-safe
            worst = torch.stack([r.max() for r in radii]).max().float()
            pl_module.log("stability/spectral_radius", worst, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")

    # ---- the loss and gradients: never step on NaN ------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if self.check_every_n_steps > 1:  # no host read: zero the gradients on the device, count the step
            for g in grads:
                g.masked_fill_(~finite, 0)
            self._bad_grads = (~finite).float() if self._bad_grads is None else self._bad_grads + (~finite).float()
            return
        if not bool(finite):  # one host sync per step
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: no NaN enters the weights
            self._stop(trainer, f"non-finite gradients at step {trainer.global_step}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Under DDP every decision below is taken from statistics averaged over all processes, so
        # each process takes the same one (a stop or a new Jacobian weight on one rank alone would
        # leave the others waiting in the next collective). The phase check is the same on every
        # rank, so the reduction is called by all of them or by none.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        sol = getattr(pl_module, "_last_solution", None)
        solving = sol is not None and sol.tol > 0 and not sol.solver.startswith("unrolled")
        # the unrolled warm-up (pretrain_steps) runs N plain steps, not a solve to tol
        if self.check_every_n_steps > 1:
            self._accumulate(trainer, pl_module, loss, sol, solving)
            return
        local = torch.zeros(4)  # non-finite loss?, samples near tol, samples within tol, samples
        local[0] = float(isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()))
        if solving and sol.converged.numel():
            # Training budgets are deliberately tight (few solver steps), so "not converged to tol"
            # is normal; losing the equilibrium means residuals far above tol, or divergence.
            near = self._near(sol)
            n = sol.converged.numel()
            local[1:] = torch.stack([near.float().sum(), sol.converged.float().sum(), torch.tensor(float(n))]).cpu()
        bad_loss, near_total, reached_total, count = self._all_ranks(trainer, local).tolist()  # one host read
        if getattr(self, "stability_pending", False):
            self.stability_pending = False
            self._log_stability(trainer, pl_module)
        if bad_loss > 0:
            self._stop(trainer, f"the loss became non-finite ({float(loss) if isinstance(loss, torch.Tensor) else loss} on this process) at step {trainer.global_step}")
            return
        if not solving or count == 0:
            return
        self._decide(trainer, pl_module, sol, near_total / count, reached_total / count)

    def _near(self, sol: Any) -> torch.Tensor:
        """Per sample: near equilibrium (within ``near_factor`` x tol, not diverged), forward and backward."""
        near = (sol.residual <= self.near_factor * sol.tol) & ~sol.diverged
        bw = getattr(sol, "backward", None)  # the implicit backward's linear solve: its gradient is only as good as its residual
        if bw is not None and bw.converged is not None and bw.residual is not None and bw.converged.shape == near.shape:
            near = near & (bw.converged | (bw.residual <= self.near_factor * sol.tol))
        return near

    def _accumulate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any, sol: Any, solving: bool) -> None:
        """``check_every_n_steps`` > 1: add this step's counts on the device; read them every N steps."""
        device = loss.device if isinstance(loss, torch.Tensor) else pl_module.device
        local = torch.zeros(5, device=device)  # non-finite losses, non-finite gradients, near, reached, samples
        if isinstance(loss, torch.Tensor):
            local[0] = (~torch.isfinite(loss.detach()).all()).float()
        if self._bad_grads is not None:
            local[1] = self._bad_grads.to(device)
            self._bad_grads = None
        if solving and sol.converged.numel():
            local[2] = self._near(sol).float().sum()
            local[3] = sol.converged.float().sum()
            local[4] = sol.converged.numel()
        self._pending = local if self._pending is None else self._pending + local
        self._pending_steps += 1
        if solving:
            self._pending_solution = sol
        if self._reads_now(trainer):
            self._read_pending(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_steps:  # check_every_n_steps > 1: no non-finite step of an epoch goes unread
            self._read_pending(trainer, pl_module, partial=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_steps:  # (a run that ends on max_steps between reads)
            self._read_pending(trainer, pl_module, partial=True)

    def _read_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule, partial: bool = False) -> None:
        """Read the device sums of the steps since the last read (one host read) and act on them.
        A ``partial`` read (epoch end between reads) acts on non-finite steps only and keeps the
        counts, so the convergence windows still hold whole reads of ``check_every_n_steps`` steps."""
        sums, steps, sol = self._pending, self._pending_steps, self._pending_solution
        if not partial:
            self._pending, self._pending_steps, self._pending_solution = None, 0, None
        if sums is None:
            return
        bad_loss, bad_grads, near_total, reached_total, count = self._all_ranks(trainer, sums).tolist()
        if getattr(self, "stability_pending", False):
            self.stability_pending = False
            self._log_stability(trainer, pl_module)
        if bad_loss > 0 or bad_grads > 0:
            what = " and ".join(w for w, n in (("a non-finite loss", bad_loss), ("non-finite gradients", bad_grads)) if n > 0)
            self._stop(
                trainer,
                f"{what} in {int(max(bad_loss, bad_grads))} of the last {steps} steps (up to step {trainer.global_step}; "
                "the guard reads every check_every_n_steps; those steps' gradients were zeroed on the device, the weights are finite)",
            )
            return
        if partial or count == 0 or sol is None:
            return
        self._decide(trainer, pl_module, sol, near_total / count, reached_total / count)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sol: Any, near_fraction: float, reached_fraction: float) -> None:
        """Escalate (``actions``, ``budget_actions``) on the fractions of one read."""
        self.recent.append(near_fraction)
        self._check_budget(trainer, sol, reached_fraction, pl_module)
        if len(self.recent) < (self.recent.maxlen or 1):
            return
        mean = sum(self.recent) / len(self.recent)
        if mean >= self.min_converged_fraction or self.level >= len(self.actions):
            return
        action = self.actions[self.level]
        self.level += 1
        self.recent.clear()
        residual = float(sol.residual.max())
        what = (
            f"DEQ training is losing its equilibrium: only {mean:.0%} of samples came (forward and backward) within {self.near_factor:g}x the "
            f"tolerance over the last "
            f"{self.window} steps (step {trainer.global_step}, max rel. residual {residual:.3g}, {sol.nfe} f-evals)."
        )
        if action == "warn":
            self.events.append("warn")
            rank_zero_warn(f"{what} {ADVICE}", category=ConvergenceWarning)
        elif action == "increase_jacobian":
            self._increase_jacobian(pl_module, what)
        else:
            self._stop(trainer, what)

    @staticmethod
    def _all_ranks(trainer: pl.Trainer, local: torch.Tensor) -> torch.Tensor:
        """``local`` (counts) summed over all processes, in one collective; one process: itself."""
        if getattr(trainer, "world_size", 1) <= 1:  # (one process, or a stand-in trainer)
            return local
        return trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()

    def _increase_jacobian(self, pl_module: pl.LightningModule, what: str) -> None:
        """Multiply the module's Jacobian weight (or start it), up to ``max_jacobian_weight``."""
        schedule = getattr(pl_module, "jacobian", None)
        if schedule is None:
            self.events.append("increase_jacobian(unavailable)")
            return
        if schedule.weight >= self.max_jacobian_weight:
            return
        new = min(self.max_jacobian_weight, schedule.weight * self.jacobian_factor if schedule.weight > 0 else self.initial_jacobian_weight)
        schedule.weight = new
        schedule.warmup_steps = 0
        self.jacobian_weight = new
        self.events.append(f"increase_jacobian({new:g})")
        rank_zero_warn(f"{what} Raising the Jacobian-regularization weight to {new:g}.", category=ConvergenceWarning)

    def _check_budget(self, trainer: pl.Trainer, sol: Any, reached_fraction: float, pl_module: pl.LightningModule) -> None:
        """Act (``budget_actions``) when samples come near equilibrium but rarely reach the tolerance."""
        self.reached.append(reached_fraction)
        if len(self.reached) < (self.reached.maxlen or 1):
            return
        repeat = bool(self.budget_actions) and self.budget_actions[-1] == "increase_jacobian"
        if self.budget_level >= len(self.budget_actions) and not repeat:
            return
        mean = sum(self.reached) / len(self.reached)
        if mean >= self.min_converged_fraction:
            return
        action = self.budget_actions[min(self.budget_level, len(self.budget_actions) - 1)]
        self.budget_level += 1
        self.reached.clear()  # each action waits for a fresh window
        median = float(sol.residual.median())
        what = (
            f"Only {mean:.0%} of samples reached the solver tolerance (tol={sol.tol:g}) over the last {self.budget_window} "
            f"training steps (step {trainer.global_step}; median rel. residual {median:.3g}, {median / max(sol.tol, 1e-30):.1f}x tol, "
            f"{sol.nfe} f-evals). The network may be learning the truncated iteration rather than an equilibrium; "
            "such a model loses accuracy when evaluated with more solver steps."
        )
        if action == "warn":
            self.events.append("budget_warning")
            rank_zero_warn(
                f"{what} What to try: Jacobian regularization (jacobian_weight > 0, or a larger one; "
                "ConvergenceGuard(budget_actions=('warn', 'increase_jacobian')) raises it automatically), the implicit "
                "backward instead of a 1-step phantom gradient, or a larger train_max_steps.",
                category=ConvergenceWarning,
            )
        elif action == "increase_jacobian":
            self._increase_jacobian(pl_module, what)
        else:
            self._stop(trainer, what)

    def _stop(self, trainer: pl.Trainer, why: str) -> None:
        if self.stopped_reason is not None:
            return
        self.stopped_reason = (
            f"ConvergenceGuard stopped training: {why} The last checkpoint is intact; resume after changing "
            f"the model or recipe. {ADVICE} Run `mdeq doctor --config <your config>` for a diagnosis."
        )
        self.events.append("stop")
        trainer.should_stop = True
        rank_zero_warn(self.stopped_reason, category=ConvergenceWarning)

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "recent": list(self.recent), "events": list(self.events), "reached": list(self.reached), "budget_level": self.budget_level, "jacobian_weight": self.jacobian_weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.level = state_dict.get("level", 0)
        self.recent = deque(state_dict.get("recent", []), maxlen=self._checks(self.window))
        self.events = list(state_dict.get("events", []))
        self.reached = deque(state_dict.get("reached", []), maxlen=self._checks(self.budget_window))
        self.jacobian_weight = state_dict.get("jacobian_weight")
        self.budget_level = int(state_dict.get("budget_level", int(bool(state_dict.get("budget_warned", False)))))


def _deq_layers(module: torch.nn.Module) -> list[Any]:
    from mdeq.nn.deq import deq_layers

    return deq_layers(module)
