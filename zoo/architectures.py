"""Every zoo model, declared once: its constructor (in :mod:`mdeq.models`), the task whose inputs
it takes, and the entries whose weights ship in ``checkpoints/`` (trained with ``mdeq fit``,
exported with ``mdeq export``; each card records the config, the measuring command and the
results). Adding a model = its constructor, one line here, and (with weights) its files."""

from __future__ import annotations

from mdeq import models
from zoo.registry import register_model

register_model(models.mdeq_digits, task="digits", pretrained={"mdeq_digits": "digits"})
register_model(models.mdeq_mnist, task="mnist", pretrained={"mdeq_mnist": "mnist", "mdeq_fashion_mnist": "fashion_mnist"})
register_model(models.deq_mlp_mnist, task="mnist", pretrained={"deq_mlp_mnist": "mnist"})
register_model(models.mdeq_tiny, task="cifar10", pretrained={"mdeq_tiny_cifar10": "cifar10"})
register_model(models.conv_deq_small, task="cifar10", pretrained={"conv_deq_small_cifar10": "cifar10"})
register_model(models.mdeq_tiny_gray, task="mnist")
register_model(models.conv_deq_small_gray, task="mnist")
register_model(models.mdeq_large, task="cifar10")
register_model(models.mdeq_imagenet_small, task="imagenet")
register_model(models.deq_toy_regressor, task="linear_toy")
