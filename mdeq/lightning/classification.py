"""The classification LightningModule: a thin wrapper that trains any DEQ backbone."""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path
from typing import IO, Any, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mdeq.core.budget import KEEP, SolverBudget, solver_budget
from mdeq.core.jacobian import JacobianRegularization, probe_keys
from mdeq.core.solution import DEQSolution
from mdeq.lightning.guard import ConvergenceGuard
from mdeq.nn.deq import deq_layers
from mdeq.lightning.recipes import (
    OPTIMIZERS,
    SCHEDULERS,
    JacobianSchedule,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    restore_rng_state,
)


def build_backbone(
    backbone: Union[str, nn.Module],
    backbone_kwargs: dict[str, Any] | None,
    pretrained: bool = False,
    init_weights: str | None = None,
    init_weights_sha256: str | None = None,
) -> nn.Module:
    """A backbone instance from a zoo name (with keyword arguments) or the instance itself;
    ``pretrained`` loads the zoo's shipped weights, ``init_weights`` a file of your own (checked
    against ``init_weights_sha256`` and against the model card beside it, when there is one)."""
    if pretrained and init_weights is not None:
        raise ValueError("give either pretrained=True (the zoo's shipped weights) or init_weights (a file), not both")
    if init_weights_sha256 is not None and init_weights is None:
        raise ValueError("init_weights_sha256 checks an init_weights file, but no init_weights was given")
    if init_weights is not None:
        return load_backbone_weights(build_backbone(backbone, backbone_kwargs), init_weights, init_weights_sha256)
    if isinstance(backbone, nn.Module):
        if backbone_kwargs:
            raise ValueError("backbone_kwargs only apply when the backbone is given by name")
        return backbone
    import zoo

    kwargs = dict(backbone_kwargs or {})
    if pretrained:
        kwargs["pretrained"] = True
    # zoo.create(pretrained=True) returns an eval-ready model; Lightning does not switch modes
    # when fit starts, so hand the trainer a module in training mode (BatchNorm, dropout).
    return zoo.create(backbone, **kwargs).train()


def load_backbone_weights(model: nn.Module, path: str, sha256: str | None = None) -> nn.Module:
    """Start ``model`` from the weights in ``path``: a Lightning checkpoint of an mdeq module (its
    ``backbone.`` tensors), a zoo ``.safetensors`` file or a plain state dict. Read without running
    code (safetensors or ``weights_only=True``); names, shapes and dtypes must match exactly and
    values be finite. The file's SHA-256 must equal ``sha256`` when given, and the ``sha256`` of a
    model card beside it (``<stem>.json``, as ``mdeq export`` writes) when there is one. Only the
    weights load: optimiser, schedule and step count start fresh (resuming is ``--ckpt_path``)."""
    from zoo.card import read_card
    from zoo.weights import WeightsError, backbone_state, check_compatible, check_sha256_field, check_values, read_tensors, sha256_of

    source = f"init_weights {path}"
    card = Path(path).with_suffix(".json")
    expected = [(check_sha256_field(sha256, f"{source}: init_weights_sha256"), "init_weights_sha256")] if sha256 is not None else []
    if Path(path).suffix == ".safetensors" and card.is_file():
        expected.append((check_sha256_field(read_card(card).sha256, f"model card {card}"), f"the card {card}"))
    if expected and Path(path).is_file():
        actual = sha256_of(path)
        for want, where in expected:
            if actual != want:
                raise WeightsError(f"{source}: SHA-256 mismatch with {where} (the file was changed, truncated or replaced): expected {want}, got {actual}")
    tensors = backbone_state(read_tensors(path))
    check_compatible(model, tensors, source)
    check_values(model, tensors, source)
    model.load_state_dict(tensors, strict=True)
    return model


def weights_origin(backbone: Union[str, nn.Module], pretrained: bool, init_weights: str | None) -> dict[str, str] | None:
    """Where a run's starting weights came from, with their SHA-256 (kept in its checkpoints, so an
    exported card can say what training started from even after those weights are replaced)."""
    if init_weights is not None:
        from zoo.weights import sha256_of

        return {"init_weights": str(init_weights), "sha256": sha256_of(init_weights)}
    if pretrained and isinstance(backbone, str):
        import zoo

        return {"zoo_weights": backbone, "sha256": zoo.card(backbone).sha256}
    return None


OPTION_RULES: dict[str, tuple[str, Any]] = {
    # name: (what it must be, test); None passes for the Optional solver budgets
    "lr": ("> 0 (a finite number)", lambda v: _number(v) and v > 0),
    "weight_decay": (">= 0 (a finite number)", lambda v: _number(v) and v >= 0),
    "momentum": ("in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "skip_weight": (">= 0 (a finite number)", lambda v: _number(v) and v >= 0),
    "min_lr_ratio": ("in [0, 1] (the cosine schedule's floor, as a fraction of lr)", lambda v: _number(v) and 0 <= v <= 1),
    "warmup_steps": (">= 0 (an integer)", lambda v: _integer(v) and v >= 0),
    "jacobian_warmup_steps": (">= 0 (an integer)", lambda v: _integer(v) and v >= 0),
    "pretrain_steps": (">= 0 (an integer)", lambda v: _integer(v) and v >= 0),
    "jacobian_probes": (">= 1 (an integer)", lambda v: _integer(v) and v >= 1),
    "pretrain_unroll": (">= 1 (an integer)", lambda v: _integer(v) and v >= 1),
    "train_max_steps": (">= 1 (an integer) or None", lambda v: v is None or (_integer(v) and v >= 1)),
    "eval_max_steps": (">= 1 (an integer) or None", lambda v: v is None or (_integer(v) and v >= 1)),
    "train_tol": ("in (0, 1] or None", lambda v: v is None or (_number(v) and 0 < v <= 1)),
    "eval_tol": ("in (0, 1] or None", lambda v: v is None or (_number(v) and 0 < v <= 1)),
    "train_fixed_budget": ("true or false", lambda v: isinstance(v, bool)),
    "label_smoothing": ("in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(**values: Any) -> None:
    """Raise :class:`~mdeq.lightning.errors.ConfigError` naming the first option outside its rule
    in :data:`OPTION_RULES`."""
    from mdeq.lightning.errors import ConfigError

    for name, value in values.items():
        what, ok = OPTION_RULES[name]
        if not ok(value):
            raise ConfigError(f"{name} must be {what}, got {value!r}")


class DEQLightningModule(pl.LightningModule):
    """What every mdeq LightningModule shares: backbone, DEQ recipes, optimiser, logging of
    solver statistics, resumable random state."""

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        init_weights: str | None = None,
        init_weights_sha256: str | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        jacobian_weight: float = 0.0,
        jacobian_probability: float = 1.0,
        jacobian_start_weight: float = 0.0,
        jacobian_warmup_steps: int = 0,
        jacobian_backend: str = "vjp",
        jacobian_probes: int = 1,
        skip_weight: float = 0.0,
        pretrain_steps: int = 0,
        pretrain_unroll: int = 8,
        train_max_steps: int | None = None,
        eval_max_steps: int | None = None,
        train_tol: float | None = None,
        eval_tol: float | None = None,
        train_fixed_budget: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.backbone = build_backbone(backbone, backbone_kwargs, pretrained, init_weights, init_weights_sha256)
        self.started_from = weights_origin(backbone, pretrained, init_weights)
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.scheduler_name, self.warmup_steps, self.min_lr_ratio = scheduler, warmup_steps, min_lr_ratio
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {SCHEDULERS}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
        check_options(
            lr=lr, weight_decay=weight_decay, momentum=momentum, warmup_steps=warmup_steps, skip_weight=skip_weight,
            min_lr_ratio=min_lr_ratio, jacobian_warmup_steps=jacobian_warmup_steps, jacobian_probes=jacobian_probes,
            pretrain_steps=pretrain_steps, pretrain_unroll=pretrain_unroll, train_max_steps=train_max_steps,
            eval_max_steps=eval_max_steps, train_tol=train_tol, eval_tol=eval_tol, train_fixed_budget=train_fixed_budget,
        )
        self.jacobian = JacobianSchedule(jacobian_weight, jacobian_probability, jacobian_start_weight, jacobian_warmup_steps, seed)
        self.regularizer = JacobianRegularization(backend=jacobian_backend, n_probes=jacobian_probes)
        self.skip_weight = skip_weight
        self.pretrain_steps, self.pretrain_unroll = pretrain_steps, pretrain_unroll
        # A fixed training budget runs every solve (forward and the implicit backward) for exactly
        # its max_steps with no host read: the GPU recipe's step never waits for the device.
        self.train_budget = SolverBudget(train_max_steps, train_tol, fixed=True if train_fixed_budget else None)
        self.eval_budget = SolverBudget(eval_max_steps, eval_tol)
        self.deqs = deq_layers(self.backbone)
        if not self.deqs:
            raise ValueError(f"backbone {type(self.backbone).__name__} contains no DEQ layer")
        params = inspect.signature(self.backbone.forward).parameters
        if "return_solution" not in params:
            raise TypeError(f"{type(self.backbone).__name__}.forward must accept return_solution=True and return (output, solution)")
        if pretrain_steps and "unroll" not in params:
            raise TypeError(f"pretrain_steps needs a backbone whose forward accepts unroll=N; {type(self.backbone).__name__} does not")
        self._last_solution: DEQSolution | None = None

    # ---- phases ----------------------------------------------------------------------------
    def budget(self, training: bool) -> SolverBudget:
        """The solver budget of this step: the phase's ``max_steps``/``tol`` (None keeps each
        layer's own) and, in training with a Jacobian weight, the regularizer on the steps the
        schedule draws and off on the others. It is passed to the layers for the call
        (:func:`~mdeq.core.budget.solver_budget`); their own attributes are never rewritten. It is
        ``quiet`` where the module reports convergence itself (:meth:`reports_convergence`)."""
        phase = self.train_budget if training else self.eval_budget
        jacobian: Any = KEEP
        if training and self.jacobian.weight > 0:
            jacobian = self.regularizer if self.jacobian.active(self.global_step) else None
        return SolverBudget(phase.max_steps, phase.tol, jacobian, fixed=phase.fixed, quiet=self.reports_convergence(training))

    def reports_convergence(self, training: bool) -> bool:
        """Whether this module, not each DEQ layer, reports convergence in this phase: evaluation
        always (the converged fraction and residuals are logged, shown in the result line and written
        with predictions; a freshly initialised model's sanity check is not worth a warning), training
        when a :class:`~mdeq.lightning.guard.ConvergenceGuard` watches the run (it warns, with advice,
        when the equilibrium is being lost over a window of steps, instead of a warning per batch
        while a tight training budget leaves samples above tol). Layers set to "raise" still raise."""
        if not training:
            return True
        trainer = self._trainer
        return trainer is not None and any(isinstance(cb, ConvergenceGuard) for cb in trainer.callbacks)

    def run_backbone(self, x: Tensor, training: bool) -> tuple[Tensor, DEQSolution]:
        with solver_budget(self.budget(training)):
            if training and self.global_step < self.pretrain_steps:
                return self.backbone(x, return_solution=True, unroll=self.pretrain_unroll)
            keyed = training and self.jacobian.weight > 0  # probes are only drawn with the regularizer on
            with probe_keys(self._probe_keys(len(x), x.device) if keyed else None):
                return self.backbone(x, return_solution=True)

    def _probe_keys(self, batch_size: int, device: torch.device) -> Tensor:
        """One Hutchinson-probe key per sample: (seed, step, position in the global batch). With
        the DataModules' sampler, rank r of W holds global positions r, r + W, ... of the batch
        a single process would see, so each sample gets the same probe in both settings."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        base = (self.jacobian.seed * 1_000_003 + self.global_step) << 20
        return base + torch.arange(batch_size, device=device) * world + rank

    def regularized(self, loss: Tensor, solution: DEQSolution, prefix: str) -> Tensor:
        if solution.jacobian_loss is not None and self.jacobian.weight > 0:
            w = self.jacobian.weight_at(self.global_step)
            loss = loss + w * solution.jacobian_loss
            self.log(f"{prefix}/jacobian_weight", w, on_step=True, on_epoch=False)
        if solution.skip_loss is not None and self.skip_weight > 0:
            loss = loss + self.skip_weight * solution.skip_loss
        return loss

    def log_solution(self, solution: DEQSolution, prefix: str, batch_size: int) -> None:
        on_step = prefix == "train"
        res = solution.residual.detach()
        values = {
            f"{prefix}/nfe": float(solution.nfe),
            f"{prefix}/residual_mean": res.mean() if res.numel() else 0.0,
            f"{prefix}/residual_max": res.max() if res.numel() else 0.0,
            f"{prefix}/converged_fraction": solution.converged.float().mean() if res.numel() else 1.0,
        }
        if solution.jacobian_loss is not None:
            values[f"{prefix}/jacobian_loss"] = solution.jacobian_loss.detach()
        if solution.skip_loss is not None:
            values[f"{prefix}/skip_loss"] = solution.skip_loss.detach()
        # averaged over processes under DDP (training too: its epoch means would otherwise be rank
        # 0's alone; this costs one small all-reduce per logged value and step, none in 1 process)
        self.log_dict(values, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if optimizers:
            self.log("train/lr", optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        sol = self._last_solution
        if sol is not None and sol.backward is not None:
            bw = sol.backward
            values: dict[str, Any] = {"train/backward_nfe": float(bw.nfe)}
            if bw.residual is not None and bw.residual.numel():
                values["train/backward_residual_max"] = bw.residual.max()
            self.log_dict(values, on_step=True, on_epoch=False)
        self._last_solution = None

    # ---- steps: subclasses implement _step(batch, split) -> (loss, solution) ----------------------
    def _step(self, batch: Any, split: str) -> tuple[Tensor, DEQSolution]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        with solver_budget(self.budget(training=False)):
            return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, sol = self._step(batch, "train")
        self._last_solution = sol
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # ---- checkpoints: atomic writes, reads that never run code ---------------------------------
    def setup(self, stage: str) -> None:
        """Before Lightning restores a ``ckpt_path`` and converts layers (it calls ``setup`` first):
        make the trainer read checkpoints with :func:`~mdeq.lightning.checkpoint_io.read_checkpoint`
        (plain data only, local or ``http(s)://``) and write them atomically, and make
        ``sync_batchnorm=True`` work on every backend (:mod:`mdeq.lightning.sync_batchnorm`)."""
        from mdeq.lightning.checkpoint_io import use_atomic_checkpoints
        from mdeq.lightning.sync_batchnorm import use_portable_sync_batchnorm

        use_atomic_checkpoints(self.trainer)
        use_portable_sync_batchnorm(self.trainer)  # sync_batchnorm=True works on CPU/gloo too

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Union[str, Path, IO],
        map_location: Any = None,
        hparams_file: Union[str, Path, None] = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> "DEQLightningModule":
        """Lightning's ``load_from_checkpoint``, reading the file (local or a URL) with
        :func:`~mdeq.lightning.checkpoint_io.read_checkpoint`: pickled code is refused, never run.

        The checkpoint holds every weight, so the run's starting weights (``init_weights`` file,
        ``pretrained`` zoo weights) are not read again: the module loads after that file is gone
        (pass them explicitly to override). Where training started from stays recorded."""
        from mdeq.lightning.checkpoint_io import read_checkpoint

        kwargs.setdefault("init_weights", None)
        kwargs.setdefault("init_weights_sha256", None)
        kwargs.setdefault("pretrained", False)

        checkpoint = read_checkpoint(checkpoint_path, map_location="cpu", weights_only=weights_only)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # plain data only: Lightning re-reads it with weights_only=True
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True, **kwargs)  # type: ignore[return-value]

    # ---- optimisation and state --------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.parameters(), self.optimizer_name, self.lr, self.weight_decay, self.momentum)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        if not math.isfinite(total):  # max_epochs -1 (and no max_steps): a run without an end
            if self.scheduler_name == "cosine":
                from mdeq.lightning.errors import ConfigError

                raise ConfigError(
                    "scheduler 'cosine' decays over the run's length, but this run has no end (trainer.max_epochs -1 and no "
                    "max_steps): set --trainer.max_epochs N or --trainer.max_steps N, or use --model.init_args.scheduler constant"
                )
            total = 1
        total = int(total)
        sched = build_scheduler(opt, self.scheduler_name, self.warmup_steps, total, self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mdeq_rng_state"] = capture_rng_state()
        if self.started_from is not None:
            checkpoint["mdeq_started_from"] = self.started_from

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "mdeq_rng_state" in checkpoint:
            restore_rng_state(checkpoint["mdeq_rng_state"])
        if "mdeq_started_from" in checkpoint:  # what the run first started from, not today's file
            self.started_from = checkpoint["mdeq_started_from"]


class ClassificationModule(DEQLightningModule):
    """Trains a classifier whose ``forward(x, return_solution=True)`` returns (logits, solution).

    Loss = cross-entropy (with ``label_smoothing`` in training) + Jacobian weight * jacobian_loss +
    skip weight * skip_loss. Logs loss,
    top-1 (and top-5 when there are more than 5 classes) accuracy and the solver statistics
    (forward f-evaluations, backward iterations, residual mean/max, fraction converged,
    Jacobian loss) per step and per epoch.
    """

    def __init__(
        self, backbone: Union[str, nn.Module] = "mdeq_digits", num_classes: int | None = None, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        """``num_classes`` is set once: None takes the backbone's (a zoo model's comes from its
        task); a number builds a zoo backbone with that many classes. A backbone with another
        count, or data with another count (checked before training), is one clear error."""
        from mdeq.lightning.errors import ConfigError

        bk = dict(kwargs.get("backbone_kwargs") or {})
        if num_classes is not None and isinstance(backbone, str) and "num_classes" not in bk:
            kwargs["backbone_kwargs"] = {**bk, "num_classes": num_classes}
        super().__init__(backbone, **kwargs)
        check_options(label_smoothing=label_smoothing)
        self.label_smoothing = float(label_smoothing)
        own = getattr(self.backbone, "num_classes", None)
        if num_classes is None and isinstance(own, int) and own >= 1:
            num_classes = own
        elif num_classes is not None and isinstance(own, int) and own != num_classes:
            raise ConfigError(f"num_classes={num_classes} but the backbone {type(self.backbone).__name__} predicts {own} classes (backbone_kwargs.num_classes); set one of them only")
        self.num_classes: int | None = None  # a backbone that does not say: the data's, at setup
        self.metrics = nn.ModuleDict()
        if num_classes is not None:
            self._set_classes(num_classes)

    def _set_classes(self, num_classes: int) -> None:
        self.num_classes = num_classes
        # training accuracy is computed on the device in _step (torchmetrics' per-batch checks and
        # one-hot encodings read the host); evaluation counts with torchmetrics
        for split in ("val", "test"):
            self.metrics[f"{split}_acc"] = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
            if num_classes > 5:
                self.metrics[f"{split}_top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
        self.metrics["test_per_class"] = MulticlassAccuracy(num_classes=num_classes, average=None)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.check_data_classes()

    def check_data_classes(self) -> None:
        """Before any batch runs: the data's class count must be the model's."""
        from mdeq.lightning.errors import ConfigError

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        theirs = getattr(dm, "num_classes", None)
        if self.num_classes is None:
            if not isinstance(theirs, int) or theirs < 1:
                raise ConfigError(f"num_classes: neither {type(self.backbone).__name__} nor the data says how many classes there are; set model.init_args.num_classes")
            self._set_classes(theirs)
            self.metrics.to(self.device)
        elif isinstance(theirs, int) and theirs != self.num_classes:
            name = getattr(getattr(dm, "task", None), "name", None) or type(dm).__name__
            raise ConfigError(
                f"the data ({name}) has {theirs} classes but the model predicts {self.num_classes} "
                "(model.init_args.num_classes or the backbone's); make them equal"
            )

    def _step(self, batch: Any, split: str) -> tuple[Tensor, DEQSolution]:
        x, y = batch
        logits, sol = self.run_backbone(x, training=split == "train")
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the backbone returns {logits.shape[-1]} logits but num_classes={self.num_classes}")
        # label smoothing shapes the training loss only; reported val/test losses are plain cross-entropy
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if split == "train" else 0.0)
        loss = self.regularized(ce, sol, split) if split == "train" else ce
        on_step = split == "train"
        metrics: dict[str, Any] = {f"{split}/loss": loss.detach()}
        if on_step:  # batch means on the device (no host read); the epoch value is their batch-size-weighted mean
            detached = logits.detach()
            metrics["train/acc"] = (detached.argmax(-1) == y).float().mean()
            if self.num_classes > 5:
                metrics["train/top5"] = (detached.topk(5, dim=-1).indices == y[:, None]).any(-1).float().mean()
        else:
            self.metrics[f"{split}_acc"](logits.detach(), y)
            metrics[f"{split}/acc"] = self.metrics[f"{split}_acc"]
            if f"{split}_top5" in self.metrics:
                self.metrics[f"{split}_top5"](logits.detach(), y)
                metrics[f"{split}/top5"] = self.metrics[f"{split}_top5"]
        self.log_dict(metrics, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log_solution(sol, split, len(y))
        if split == "test":
            self.metrics["test_per_class"].update(logits.detach(), y)
        return loss, sol

    def on_test_epoch_end(self) -> None:
        """Accuracy per class (synchronised across processes): ``test/acc_class/<name>`` for every
        logger, and one table (class, accuracy) for loggers that keep tables (W&B)."""
        metric = self.metrics["test_per_class"]
        if not metric.update_called:
            return
        per_class = metric.compute().float().cpu()
        metric.reset()
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(dm, "task", None)
        names = [task.label(i) if task is not None else str(i) for i in range(len(per_class))]
        for n, acc in zip(names, per_class.tolist()):
            self.log(f"test/acc_class/{n}", acc, sync_dist=False)
        if self.trainer.is_global_zero:
            for lg in self.loggers:
                if hasattr(lg, "log_table"):
                    lg.log_table(key="test/per_class_accuracy", columns=["class", "accuracy"], data=[[n, a] for n, a in zip(names, per_class.tolist())])

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:  # type: ignore[override]
        """Class probabilities, and per sample whether the solve converged and its residual
        (what :class:`~mdeq.lightning.prediction_writer.PredictionWriter` writes)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, sol = self.run_backbone(x, training=False)
        return {"probabilities": logits.softmax(-1), "converged": sol.converged, "residual": sol.residual}
