"""The named architectures of mdeq.models, registered under their names (random init)."""

from __future__ import annotations

from mdeq import models
from zoo.registry import register_model, register_pretrained

ARCHITECTURES = (
    "mdeq_digits",
    "mdeq_tiny",
    "mdeq_tiny_gray",
    "mdeq_mnist",
    "deq_mlp_mnist",
    "mdeq_large",
    "mdeq_imagenet_small",
    "conv_deq_small",
    "conv_deq_small_gray",
    "deq_toy_regressor",
)

for _name in ARCHITECTURES:
    register_model(getattr(models, _name))

# Task-specific entries whose weights ship in checkpoints/ (trained with `mdeq fit` and exported
# with `mdeq export`; the card records the config, the measuring command and the results).
PRETRAINED = {
    "mdeq_digits": ("mdeq_digits", "digits"),
    "deq_mlp_mnist": ("deq_mlp_mnist", "mnist"),
    "mdeq_mnist": ("mdeq_mnist", "mnist"),
    "mdeq_fashion_mnist": ("mdeq_mnist", "fashion_mnist"),
    "conv_deq_small_cifar10": ("conv_deq_small", "cifar10"),
    "mdeq_tiny_cifar10": ("mdeq_tiny", "cifar10"),
}

for _name, (_arch, _task) in PRETRAINED.items():
    register_pretrained(_name, getattr(models, _arch), _task, f"{_name}.safetensors")
