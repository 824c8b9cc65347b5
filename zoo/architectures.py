"""The named architectures of mdeq.models, registered under their names (random init)."""

from __future__ import annotations

from mdeq import models
from zoo.registry import register_model

ARCHITECTURES = (
    "mdeq_digits",
    "mdeq_tiny",
    "mdeq_tiny_gray",
    "mdeq_large",
    "mdeq_imagenet_small",
    "conv_deq_small",
    "conv_deq_small_gray",
    "deq_toy_regressor",
)

for _name in ARCHITECTURES:
    register_model(getattr(models, _name))
