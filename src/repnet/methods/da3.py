"""DA3 (Yang, Rakin, Fan, CVPR-W 2022): dynamic additive attention adaptors on a frozen backbone.

The paper's equations were not available; this is a design from its description (a per-domain
additive attention adaptor whose output is *added* to the frozen feature, and which doubles as a gate
that can skip compute at inference). One adaptor per stage start reads the block's input and adds
``resize(g * a)`` to its output: an attention branch ``a`` (depthwise conv on the input pooled by 2, a
pointwise conv, last norm's gamma 0) times an SE-style channel gate ``g``; ``skip_threshold`` skips the
branch at eval when the mean gate is low. Every choice: docs/methods.md, "DA3".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repnet.methods import METHODS
from repnet.methods.base import AT_LEAST_ONE, MethodOptions, NON_NEGATIVE, ODD_KERNEL, TransferModel, opt
from repnet.methods.bias import backbone_biases
from repnet.methods.repnet import make_divisible8


class GateProduct(nn.Module):
    """``g[:, :, None, None] * a``: a per-channel gate times the branch output.

    A module (not an inline product) so that the analytic memory model sees it: its backward
    keeps ``a`` for the gate's gradient and ``g`` for the branch's (``analytic_rule``).
    """

    def forward(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return g[:, :, None, None] * a

    @staticmethod
    def analytic_rule(args, out) -> tuple[float, float]:
        """(kept for backward, transient) bytes for the papers' analytic model: each factor keeps the other."""
        g, a = args[0], args[1]
        kept = 4.0 * ((a.numel() if g.requires_grad else 0) + (g.numel() if a.requires_grad else 0))
        return kept, 4.0 * (a.numel() + out.numel())


class AttentionAdaptor(nn.Module):
    """Gated additive branch: ``resize(sigmoid(MLP(GAP(x))) * branch(AvgPool2(x)))``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, pool: int = 2, reduction: int = 4):
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else None
        hidden = make_divisible8(max(1, round(cin / reduction)))
        self.dw = nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-3)
        self.act = nn.ReLU(inplace=True)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.fc1 = nn.Linear(cin, hidden)
        self.gate_act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, cout)
        self.sigmoid = nn.Sigmoid()
        self.product = GateProduct()
        for m in (self.dw, self.pw):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        nn.init.zeros_(self.bn2.weight)  # starts as the frozen backbone

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.fc2(self.gate_act(self.fc1(x.mean((2, 3))))))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None and min(x.shape[-2:]) >= self.pool.kernel_size:
            x = self.pool(x)  # a module: the memory engine makes its backward keep nothing
        return self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))

    def forward(self, x: torch.Tensor, size, skip_threshold: float = 0.0) -> torch.Tensor | None:
        g = self.gate(x)
        if not self.training and skip_threshold > 0 and float(g.mean()) < skip_threshold:
            return None
        a = self.product(g, self.branch(x))
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        return a


@dataclass
class DA3Options(MethodOptions):
    train_bias: bool = opt(True, "also train the backbone's biases")
    kernel: int = opt(3, "depthwise kernel of the attention branch", check=ODD_KERNEL)
    reduction: int = opt(4, "gate MLP hidden width = round8(input channels / reduction)", check=AT_LEAST_ONE)
    skip_threshold: float = opt(0.0, "at eval, skip an adaptor whose mean gate is below this (0 = never)",
                                 check=NON_NEGATIVE)


@METHODS.register("da3", help="DA3: gated additive attention adaptors at stage starts (CVPR-W 2022; our design)")
class DA3(TransferModel):
    method = "da3"
    Options = DA3Options

    def build(self) -> None:
        o = self.options
        infos = self.backbone.describe(self.image_size)
        self.adaptor_blocks = self.backbone.stage_starts(self.image_size)
        self.adaptors = nn.ModuleList(
            AttentionAdaptor(infos[b].in_channels, infos[b].out_channels, o.kernel, reduction=o.reduction)
            for b in self.adaptor_blocks
        )
        self.skipped = [0] * len(self.adaptors)  # eval-time skip counts (batches), per adaptor
        for j, b in enumerate(self.adaptor_blocks):
            self.attach(b, functools.partial(self._adapt, j))

    def trainable_backbone_parameters(self):
        return backbone_biases(self) if self.options.train_bias else iter(())

    def _adapt(self, j: int, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.adaptors[j](x_in, out.shape[-2:], self.options.skip_threshold)
        if a is None:
            self.skipped[j] += 1
            return out
        return out + a
