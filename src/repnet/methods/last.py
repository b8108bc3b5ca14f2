"""FT-Last: only the new classifier trains (a linear probe on frozen features + dropout).

No backbone tensor trains and nothing is attached to the blocks: the backbone runs without keeping
anything for backward, and only the head's input is kept. The demo's ``linear_probe`` is the same
classifier fitted by L-BFGS (docs/methods.md).
"""
from __future__ import annotations

from repnet.methods import METHODS
from repnet.methods.base import TransferModel


@METHODS.register("last", help="FT-Last: only the classifier trains")
class Last(TransferModel):
    method = "last"
