"""Adversarial (input) reprogramming (Elsayed et al., ICLR 2019), as in the Rep-Net paper's Table 2.

A learnable additive perturbation ``delta`` (3 x R x R, zero at initialisation, unbounded, the whole
image) is added to the normalised input; the backbone stays frozen, but gradients must travel back
through all of it to the image, so it saves no backward memory: the paper's memory counter-example.
``input_reprogram`` trains only ``delta`` (the classifier is a fixed random projection from a fixed
seed); ``input_reprogram_last`` trains the classifier too. docs/methods.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from repnet.methods import METHODS
from repnet.methods.base import TransferModel

PROJECTION_SEED = 0


class InputProgram(nn.Module):
    """A learnable additive perturbation of the image: ``img + delta``."""

    def __init__(self, size: int, channels: int = 3):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(channels, size, size))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        delta = self.delta
        if tuple(img.shape[-2:]) != tuple(delta.shape[-2:]):
            delta = F.interpolate(delta[None], size=img.shape[-2:], mode="bilinear", align_corners=False)[0]
        return img + delta.to(img.dtype)


@METHODS.register("input_reprogram", help="adversarial input reprogramming: a learnable input perturbation "
                  "(classifier = fixed random projection)")
class InputReprogram(TransferModel):
    method = "input_reprogram"
    train_head = False

    def build(self) -> None:
        self.program = InputProgram(self.image_size)
        if not self.train_head:
            lin = self.head[1]
            g = torch.Generator().manual_seed(PROJECTION_SEED)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
                lin.bias.zero_()

    def mark_trainable(self) -> None:
        super().mark_trainable()
        if not self.train_head:
            self.head.requires_grad_(False)

    def prepare_input(self, img: torch.Tensor) -> torch.Tensor:
        return self.program(img)


@METHODS.register("input_reprogram_last", help="adversarial input reprogramming + classifier (Adv Rep + Last)")
class InputReprogramLast(InputReprogram):
    method = "input_reprogram_last"
    train_head = True
