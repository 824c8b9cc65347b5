"""DEQ layers and cells (plain nn.Modules)."""

from mdeq.nn.cells import ConvResidualCell, TanhCell
from mdeq.nn.deq import DEQ, SkipDEQ, check_cell_signature

__all__ = ["DEQ", "ConvResidualCell", "SkipDEQ", "TanhCell", "check_cell_signature"]
