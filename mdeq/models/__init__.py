"""Complete DEQ networks (plain nn.Modules): MDEQ classifiers and the tutorial conv DEQ."""

from mdeq.models.conv_deq import ConvDEQClassifier, conv_deq_small, conv_deq_small_gray
from mdeq.models.deq_mlp import DEQMLPClassifier, MLPInjectionCell, deq_mlp_mnist
from mdeq.models.mdeq_classifier import (
    MDEQClassifier,
    MDEQConfig,
    mdeq_digits,
    mdeq_imagenet_small,
    mdeq_large,
    mdeq_tiny,
    mdeq_tiny_gray,
    mdeq_mnist,
)
from mdeq.models.toy import DEQRegressor, ToyCell, deq_toy_regressor

__all__ = [
    "DEQMLPClassifier",
    "MLPInjectionCell",
    "deq_mlp_mnist",
    "ConvDEQClassifier",
    "DEQRegressor",
    "ToyCell",
    "deq_toy_regressor",
    "mdeq_digits",
    "MDEQClassifier",
    "MDEQConfig",
    "conv_deq_small",
    "conv_deq_small_gray",
    "mdeq_imagenet_small",
    "mdeq_large",
    "mdeq_tiny",
    "mdeq_tiny_gray",
    "mdeq_mnist",
]
