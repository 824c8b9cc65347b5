"""scikit-learn's bundled 8x8 digits: the embedded default, no download."""

from __future__ import annotations

from mdeq.lightning.data.base import ClassificationDataModule


class DigitsDataModule(ClassificationDataModule, task="digits"):
    """1,797 8x8 grayscale digits shipped inside scikit-learn; a stratified 80/20 train/test
    split (seeded), then ``val_fraction`` of train held out for validation."""
