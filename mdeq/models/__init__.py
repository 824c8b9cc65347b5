"""Complete DEQ networks (plain nn.Modules): MDEQ classifiers and the tutorial conv DEQ."""

from mdeq.models.conv_deq import ConvDEQClassifier, conv_deq_small, conv_deq_small_gray
from mdeq.models.mdeq_classifier import (
    MDEQClassifier,
    MDEQConfig,
    mdeq_imagenet_small,
    mdeq_large,
    mdeq_tiny,
    mdeq_tiny_gray,
)

__all__ = [
    "ConvDEQClassifier",
    "MDEQClassifier",
    "MDEQConfig",
    "conv_deq_small",
    "conv_deq_small_gray",
    "mdeq_imagenet_small",
    "mdeq_large",
    "mdeq_tiny",
    "mdeq_tiny_gray",
]
