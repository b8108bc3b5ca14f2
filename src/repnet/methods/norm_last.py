"""FT-Norm+Last: every normalisation layer's affine parameters and the classifier train.

The norms use batch statistics (``bn=batch``), as TinyTL's FT-Norm+Last does, so every norm keeps its
input for backward: the memory-hungry baseline of TinyTL's table that bias-only training improves on
(docs/methods.md, docs/memory.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from repnet.methods import METHODS
from repnet.methods.base import NORM_TYPES, MethodOptions, TransferModel, opt


@dataclass
class NormLastOptions(MethodOptions):
    bn: str = opt("batch", "backbone norm statistics (TinyTL's FT-Norm+Last uses batch statistics)", ("frozen", "batch"))


@METHODS.register("norm_last", help="FT-Norm+Last: norm layers + classifier train")
class NormLast(TransferModel):
    method = "norm_last"
    Options = NormLastOptions

    def trainable_backbone_parameters(self):
        for name, m in self.backbone.named_modules():
            if isinstance(m, NORM_TYPES):
                for pn, p in m.named_parameters(recurse=False):
                    yield f"{name}.{pn}", p
