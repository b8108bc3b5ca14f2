"""TinyTL-B: only the backbone's biases (and the classifier) train."""
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
