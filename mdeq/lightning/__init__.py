"""Lightning integration: LightningModules, DataModules, loggers (the core knows nothing of it)."""

from mdeq.lightning.callbacks import ResidualPlotCallback, StepTimer
from mdeq.lightning.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from mdeq.plots import residual_figure
from mdeq.lightning.classification import ClassificationModule, DEQLightningModule, build_backbone
from mdeq.lightning.guard import ConvergenceGuard
from mdeq.lightning.data import (
    CIFAR10DataModule,
    ClassificationDataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    LinearToyDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from mdeq.lightning.loggers import AutoWandbLogger, wandb_key_available
from mdeq.lightning.precision import SlowPrecisionWarning
from mdeq.lightning.regression import RegressionModule
from mdeq.lightning.sync_batchnorm import CrossProcessBatchNorm, PortableSyncBatchNorm
from mdeq.lightning.weight_ema import WeightEMA

__all__ = [
    "AtomicCheckpointIO",
    "use_atomic_checkpoints",
    "AutoWandbLogger",
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "ClassificationModule",
    "ConvergenceGuard",
    "CrossProcessBatchNorm",
    "DEQLightningModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "LinearToyDataModule",
    "MNISTDataModule",
    "PortableSyncBatchNorm",
    "RegressionModule",
    "ResidualPlotCallback",
    "StepTimer",
    "SlowPrecisionWarning",
    "SyntheticDataModule",
    "build_backbone",
    "residual_figure",
    "WeightEMA",
    "wandb_key_available",
]
