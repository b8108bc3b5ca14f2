"""TinyTL-B: only the backbone's biases (and the classifier) train.

Every backbone parameter whose name ends in ``bias`` trains (the norms' shifts included), at the head's
learning rate; :func:`backbone_biases` is also Rep-Net's, TinyTL-L+B's and DA3's "+bias" mode. With
frozen norm statistics a trained bias needs no stored input in backward, so this is the cheapest
method after FT-Last (docs/methods.md).
"""
from __future__ import annotations

from repnet.methods import METHODS
from repnet.methods.base import TransferModel


def backbone_biases(model: TransferModel):
    for n, p in model.backbone.named_parameters():
        if n.endswith("bias"):
            yield n, p


@METHODS.register("bias", help="TinyTL-B: backbone biases + classifier train")
class Bias(TransferModel):
    method = "bias"

    def trainable_backbone_parameters(self):
        return backbone_biases(self)
