"""DEQ layers and cells (plain nn.Modules)."""

from mdeq.nn.cells import ConvResidualCell, TanhCell, Tempered
from mdeq.nn.deq import DEQ, SkipDEQ, check_cell_signature
from mdeq.nn.multiscale import MultiScaleDEQ, MultiScaleInit, MultiScaleMap, MultiScaleSkipDEQ, NoConnection

__all__ = [
    "DEQ",
    "ConvResidualCell",
    "MultiScaleDEQ",
    "MultiScaleInit",
    "MultiScaleMap",
    "MultiScaleSkipDEQ",
    "NoConnection",
    "SkipDEQ",
    "TanhCell",
    "Tempered",
    "check_cell_signature",
]
