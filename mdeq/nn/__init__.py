"""DEQ layers and cells (plain nn.Modules)."""

from mdeq.nn.cells import ConvResidualCell, InputInjection, TanhCell, Tempered
from mdeq.nn.deq import DEQ, SkipDEQ, check_cell_signature
from mdeq.nn.norms import (
    SpectralNormConv2d,
    SpectralNormLinear,
    WeightNormConv2d,
    WeightNormLinear,
    apply_spectral_norm,
    apply_weight_norm,
    remove_spectral_norm,
    remove_weight_norm,
)
from mdeq.nn.multiscale import MultiScaleDEQ, MultiScaleInit, MultiScaleMap, MultiScaleNeuralODE, MultiScaleSkipDEQ, NoConnection

__all__ = [
    "DEQ",
    "ConvResidualCell",
    "InputInjection",
    "MultiScaleDEQ",
    "MultiScaleInit",
    "MultiScaleMap",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "NoConnection",
    "SkipDEQ",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "WeightNormConv2d",
    "WeightNormLinear",
    "apply_spectral_norm",
    "apply_weight_norm",
    "remove_spectral_norm",
    "remove_weight_norm",
    "TanhCell",
    "Tempered",
    "check_cell_signature",
]
