"""The MDEQ image classifier built from the generic :class:`MultiScaleDEQ`, and its named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.models.classifier_api import (
    check_head_options,
    check_output_fmt,
    default_pool,
    linear_or_identity,
    pick_intermediates,
    refuse_symbolic_tracing,
    select_levels,
)
from mdeq.nn.heads import MultiScaleClassificationHead
from mdeq.nn.mdeq_blocks import PostFuse, ResidualBlock, conv3x3, fusion_layer
from mdeq.nn.multiscale import MultiScaleDEQ
from mdeq.nn.norms import WeightNormConv2d


@dataclass(frozen=True)
class MDEQConfig:
    """Hyper-parameters of an MDEQ classifier (names follow the MDEQ paper's configs)."""

    channels: tuple[int, ...] = (24, 24)
    """Channels of each branch; branch i has resolution (H, W) / 2**i after the stem."""
    expansion: int = 5
    num_groups: int = 8
    head_channels: tuple[int, ...] = (8, 16)
    final_channels: int = 200
    num_classes: int = 10
    """0: no classifier; the model returns pooled features (``final_channels`` wide)."""
    global_pool: str = "avg"
    """'avg' (global average pooling) or '' (none: with ``num_classes=0``, the unpooled map)."""
    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    downsample_times: int = 0
    """Stride-2 stem convolutions (0 for CIFAR, 2 for ImageNet)."""
    dropout: float = 0.0
    weight_norm: bool = False
    init_std: float = 0.01
    block_gain: float = 0.3
    """Initial gain of each block's last GroupNorm (paper: 1)."""
    post_fuse_gain: float = 0.1
    """Initial gain of each post-fuse GroupNorm (paper: 1). With the paper's gains f is expansive
    at initialisation and the solver stalls far above tol (``mdeq doctor --model mdeq_tiny`` shows
    it; benchmarks/RESULTS.md, "Named models at initialisation"); with 0.3 / 0.1 it contracts and
    every sample of a CIFAR batch converges. Training is free to grow them."""
    solver: Any = "anderson"
    backward: Any = "implicit"
    tol: float = 1e-3
    max_steps: int = 30
    jacobian_regularization: Any = None
    on_divergence: str = "warn"
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the DEQ layer (e.g. stop_mode, record_trace)."""

    def __post_init__(self) -> None:
        n = len(self.channels)
        if n < 1:
            raise ValueError("channels needs at least one branch")
        if len(self.head_channels) != n:
            raise ValueError(f"head_channels has {len(self.head_channels)} entries for {n} branches")
        for c in self.channels:
            if c % self.num_groups or c % max(self.num_groups // 2, 1):
                raise ValueError(f"num_groups={self.num_groups} must divide every branch width {self.channels}")
        if self.downsample_times not in (0, 1, 2):
            raise ValueError(f"downsample_times must be 0, 1 or 2, got {self.downsample_times}")
        check_head_options(self.num_classes, self.global_pool, "MDEQClassifier")


class MDEQClassifier(nn.Module):
    """Stem -> multiscale DEQ (published MDEQ cell) -> multiscale classification head.

    ``forward(x)`` returns logits; ``forward(x, return_solution=True)`` returns
    ``(logits, solution)``; ``unroll=N`` replaces the solve by N weight-tied steps (pretraining).

    Note: in eval mode *before any training*, BatchNorm in the stem has no running statistics
    yet, so the injection is off-scale and the solve need not converge; after a few training
    batches (or in train mode) it does.

    Head and feature API (:mod:`mdeq.models.classifier_api`): ``forward_features`` is the head's
    fused map before pooling (``num_features = final_channels`` channels); the feature levels
    (``feature_info``, ``forward_intermediates``) are the injection and each scale's equilibrium.
    """

    first_conv = "stem.0"
    """The first convolution (its weight is adapted when loading weights for other input channels)."""
    classifier_name = "head.classifier"
    fixed_input_size = False

    def __init__(self, config: MDEQConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or MDEQConfig(), **overrides)
        self.config = cfg
        c, n, g = list(cfg.channels), len(cfg.channels), cfg.num_groups
        c0 = c[0]
        self.stem = nn.Sequential(
            conv3x3(cfg.in_channels, c0, stride=2 if cfg.downsample_times >= 1 else 1),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
            conv3x3(c0, c0, stride=2 if cfg.downsample_times >= 2 else 1),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
        )
        if cfg.downsample_times == 0 and n <= 2:
            self.injection: nn.Module = nn.Identity()
        else:
            self.injection = nn.Sequential(nn.Conv2d(c0, c0, kernel_size=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        main = [ResidualBlock(ci, cfg.expansion, g, cfg.dropout, cfg.weight_norm, cfg.block_gain) for ci in c]
        mapping = [[fusion_layer(c, src, dst, g) for dst in range(n)] for src in range(n)]
        post = [PostFuse(ci, max(g // 2, 1), cfg.weight_norm, cfg.post_fuse_gain) for ci in c]
        self.deq = MultiScaleDEQ(
            main,
            mapping,
            post,
            solver=cfg.solver,
            backward=cfg.backward,
            tol=cfg.tol,
            max_steps=cfg.max_steps,
            jacobian_regularization=cfg.jacobian_regularization,
            on_divergence=cfg.on_divergence,
            **cfg.extra,
        )
        self.head: MultiScaleClassificationHead | None = MultiScaleClassificationHead(
            c, cfg.head_channels, cfg.final_channels, cfg.num_classes, cfg.global_pool
        )
        self._init_weights(cfg.init_std)

    def _init_weights(self, std: float) -> None:
        """N(0, std) for the equilibrium cell's convolutions (as in the MDEQ paper); the stem and
        head keep PyTorch's default init so the injection has unit scale even before BatchNorm
        has running statistics."""
        for m in self.deq.modules():
            if isinstance(m, WeightNormConv2d):
                m.set_weight(torch.randn_like(m.weight_v) * std)
            elif isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.normal_(0.0, std)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                with torch.no_grad():
                    m.bias.normal_(0.0, std)

    @property
    def num_branches(self) -> int:
        return len(self.config.channels)

    def check_input(self, x: Tensor) -> None:
        """Clear errors for inputs the architecture cannot take."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (batch, {cfg.in_channels}, H, W), got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})")
        factor = 2 ** (cfg.downsample_times + self.num_branches - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"image size {tuple(x.shape[2:])} must be divisible by {factor} "
                f"({cfg.downsample_times} stem downsamplings and {self.num_branches} branches); "
                f"this model was configured for {cfg.image_size}"
            )

    def initial_state(self, injection: Tensor) -> tuple[Tensor, ...]:
        b, _, h, w = injection.shape
        return tuple(injection.new_zeros(b, ci, h >> i, w >> i) for i, ci in enumerate(self.config.channels))

    # ---- head API ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def in_chans(self) -> int:
        """Input channels (timm's name)."""
        return self.config.in_channels

    @property
    def num_features(self) -> int:
        """Channels of :meth:`forward_features`' output."""
        return self.config.final_channels

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features (``forward_head(..., pre_logits=True)``)."""
        return self.config.final_channels

    @property
    def global_pool(self) -> str:
        return self.config.global_pool

    def get_classifier(self) -> nn.Module:
        return self._head().classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none, pooled features out); ``global_pool``
        'avg' or '' (no pooling, only without a classifier); None keeps the current pooling."""
        pool = default_pool(self.config.global_pool, num_classes) if global_pool is None else global_pool
        check_head_options(num_classes, pool, type(self).__name__)
        head = self._head()
        ref = head.final[0].weight
        head.classifier = linear_or_identity(self.config.final_channels, num_classes).to(device=ref.device, dtype=ref.dtype).train(self.training)
        head.global_pool = pool
        self.config = dataclasses.replace(self.config, num_classes=num_classes, global_pool=pool)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The feature levels: the injection (stem output), then each scale's equilibrium."""
        cfg = self.config
        r = 2**cfg.downsample_times
        levels = [{"num_chs": cfg.channels[0], "reduction": r, "module": "injection"}]
        levels += [{"num_chs": c, "reduction": r * 2**i, "module": "deq"} for i, c in enumerate(cfg.channels)]
        return levels

    def pool_size(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Spatial size of :meth:`forward_features`' output for ``image_size`` (default: the configured one)."""
        h, w = image_size or self.config.image_size
        f = 2 ** (self.config.downsample_times + self.num_branches - 1)
        return (h // f, w // f)

    # ---- forward paths -----------------------------------------------------------------------
    def _head(self) -> MultiScaleClassificationHead:
        if self.head is None:
            raise RuntimeError("this model's head was removed (features_only / prune_intermediate_layers); use forward_intermediates")
        return self.head

    def _solve(self, x: Tensor, unroll: int | None = None) -> tuple[Tensor, tuple[Tensor, ...], DEQSolution]:
        refuse_symbolic_tracing(x)
        self.check_input(x)
        inj = self.injection(self.stem(x))
        zs, solution = self.deq(inj, z0=self.initial_state(inj), unroll=unroll)
        return inj, zs, solution

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's fused map at the lowest resolution, before pooling (``(B, num_features, h, w)``)."""
        _, zs, _ = self._solve(x)
        return self._head().features(zs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the output of :meth:`forward_features` and (unless ``pre_logits``) classify it."""
        return self._head().classify(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_solution: bool = False,
    ) -> Any:
        """The feature levels ``indices`` (all by default; an int n = the last n) in NCHW, and
        unless ``intermediates_only`` the :meth:`forward_features` output first: ``(final, levels)``.
        ``norm`` and ``stop_early`` are accepted for timm's signature and change nothing (the
        equilibrium couples all scales, so there is nothing to stop early). ``return_solution=True``
        appends the solve's :class:`DEQSolution`."""
        check_output_fmt(output_fmt)
        inj, zs, solution = self._solve(x)
        return pick_intermediates([inj, *zs], lambda: self._head().features(zs), solution, indices, intermediates_only, return_solution)

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the classification head (for a features-only backbone); returns the kept levels."""
        if prune_head:
            self.head = None  # type: ignore[assignment]
        return select_levels(len(self.feature_info), indices)

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        _, zs, solution = self._solve(x, unroll)
        logits = self._head()(zs)
        return (logits, solution) if return_solution else logits


# ---- named configurations (published sizes as the yardstick) ---------------------------------
def mdeq_tiny(**overrides: Any) -> MDEQClassifier:
    """CIFAR-10 "MDEQ-small" of the paper: 2 branches [24, 24], expansion 5, head [8, 16], final 200 (~0.17M)."""
    return MDEQClassifier(MDEQConfig(), **overrides)


def mdeq_tiny_gray(**overrides: Any) -> MDEQClassifier:
    """``mdeq_tiny`` for 28x28 single-channel images (MNIST, Fashion-MNIST)."""
    return MDEQClassifier(MDEQConfig(in_channels=1, image_size=(28, 28)), **overrides)


def mdeq_digits(**overrides: Any) -> MDEQClassifier:
    """A small 2-branch MDEQ (8x8 and 4x4) for scikit-learn's 8x8 digits: the embedded main job."""
    cfg = MDEQConfig(
        channels=(16, 16),
        expansion=3,
        num_groups=4,
        head_channels=(4, 8),
        final_channels=64,
        in_channels=1,
        image_size=(8, 8),
    )
    return MDEQClassifier(cfg, **overrides)


def mdeq_mnist(**overrides: Any) -> MDEQClassifier:
    """A small 2-branch MDEQ for 28x28 grayscale images (MNIST, Fashion-MNIST): one stride-2 stem
    convolution, then branches of 16 channels at 14x14 and 32 at 7x7 (~0.14M parameters). About
    4x cheaper per image than ``mdeq_tiny_gray``, so it trains on a CPU."""
    cfg = MDEQConfig(
        channels=(16, 32),
        expansion=4,
        num_groups=8,
        head_channels=(8, 16),
        final_channels=128,
        in_channels=1,
        image_size=(28, 28),
        downsample_times=1,
    )
    return MDEQClassifier(cfg, **overrides)


def mdeq_large(**overrides: Any) -> MDEQClassifier:
    """CIFAR-10 MDEQ-large: 4 branches [32, 64, 128, 256], head [14, 28, 56, 112], final 1680 (~10-11M)."""
    cfg = MDEQConfig(channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112), final_channels=1680)
    return MDEQClassifier(cfg, **overrides)


def mdeq_imagenet_small(**overrides: Any) -> MDEQClassifier:
    """ImageNet MDEQ-small: 4 branches [32, 64, 128, 256], two stride-2 stem convs, head
    [24, 48, 96, 192], final 2048, 1000 classes (~17-18M)."""
    cfg = MDEQConfig(
        channels=(32, 64, 128, 256),
        head_channels=(24, 48, 96, 192),
        final_channels=2048,
        num_classes=1000,
        image_size=(224, 224),
        downsample_times=2,
    )
    return MDEQClassifier(cfg, **overrides)
