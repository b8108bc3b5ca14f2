"""FT-Full: fine-tune every backbone weight (the accuracy / memory upper bound).

Every backbone parameter trains at the head's learning rate and the norms use batch statistics
(``bn=batch``), as full fine-tuning does; every layer then keeps its input for backward, which is what
the memory-efficient methods are measured against (docs/methods.md, docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from repnet.methods import METHODS
from repnet.methods.base import MethodOptions, TransferModel, opt


@dataclass
class FullOptions(MethodOptions):
    bn: str = opt("batch", "backbone norm statistics (full fine-tuning uses batch statistics)", ("frozen", "batch"))


@METHODS.register("full", help="FT-Full: every weight trains")
class Full(TransferModel):
    method = "full"
    Options = FullOptions

    def trainable_backbone_parameters(self):
        return self.backbone.named_parameters()
