"""CrossProcessBatchNorm outside DDP is BatchNorm; conversion keeps state and reverts to the original classes."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn

from mdeq.lightning import ClassificationModule, CrossProcessBatchNorm, PortableSyncBatchNorm
from mdeq.lightning.sync_batchnorm import use_portable_sync_batchnorm


def test_conversion_keeps_state_and_outputs_and_reverts_to_the_original_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 6), nn.BatchNorm1d(6, momentum=None))
    reference = copy.deepcopy(model)
    x = torch.randn(5, 1, 8, 8)
    converted = CrossProcessBatchNorm.convert(copy.deepcopy(model))
    assert [type(m) for m in converted.modules()].count(CrossProcessBatchNorm) == 2
    for mode in (True, False):  # training (batch statistics, running stats updated) and eval
        reference.train(mode)
        converted.train(mode)
        torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=1e-6)
    for (k, a), (_, b) in zip(converted.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    reverted = CrossProcessBatchNorm.revert(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and type(reverted[4]) is nn.BatchNorm1d and reverted[4].momentum is None


def test_trainer_sync_batchnorm_gets_the_portable_plugin():
    module = ClassificationModule(backbone="mdeq_digits", backbone_kwargs={"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16})
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=1, sync_batchnorm=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    module.setup("fit")
    assert isinstance(trainer.strategy._layer_sync, PortableSyncBatchNorm)
    use_portable_sync_batchnorm(trainer)  # idempotent
    assert isinstance(trainer.strategy._layer_sync, PortableSyncBatchNorm)
    converted = trainer.strategy._layer_sync.apply(module)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
