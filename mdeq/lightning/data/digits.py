"""scikit-learn's bundled 8x8 digits: the embedded default, no download."""

from __future__ import annotations

import torch
from torch import Tensor

from mdeq.lightning.data.base import ClassificationDataModule


class DigitsDataModule(ClassificationDataModule):
    """1,797 8x8 grayscale digits shipped inside scikit-learn; a stratified 80/20 train/test
    split (seeded), then ``val_fraction`` of train held out for validation."""

    mean = (0.3053,)
    std = (0.3760,)
    input_shape = (1, 8, 8)
    scale = 16.0

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(
            data.images, data.target, test_size=0.2, random_state=self.seed, stratify=data.target
        )
        as_img = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
        return as_img(x_tr), torch.tensor(y_tr), as_img(x_te), torch.tensor(y_te)
