"""FT-Last: only the new classifier trains (a linear probe on frozen features + dropout)."""
from __future__ import annotations

from repnet.methods import METHODS
from repnet.methods.base import TransferModel


@METHODS.register("last", help="FT-Last: only the classifier trains")
class Last(TransferModel):
    method = "last"
