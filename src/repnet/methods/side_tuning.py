"""LST-style detached side network (after Sung et al., "Ladder Side-Tuning", NeurIPS 2022).

Nothing in the backbone requires grad and the taps (the stage starts) read detached features, so no
graph is recorded through the backbone: nothing of it is kept for backward. A light side network -
per tap a 1x1 down-projection plus a Rep-Net module on the previous side state, the first reading the
image pooled by 2 - ends in a zero-initialised linear map added to the backbone's pre-logits, so the
model starts as the frozen backbone with the new head. The design and its choices: docs/methods.md,
"Side tuning".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repnet.methods import METHODS
from repnet.methods.base import AT_LEAST_ONE, KERNEL_OR_RULE, MethodOptions, POSITIVE, TransferModel, opt
from repnet.methods.repnet import RepNetModule, make_divisible8


class Down(nn.Sequential):
    """1x1 conv + BatchNorm: a tap's feature projected to the side width."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3))
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out")


@dataclass
class SideTuningOptions(MethodOptions):
    width: float = opt(0.25, "side width at a tap = round8(backbone channels x width)", check=POSITIVE)
    kernel: int = opt(0, "side module kernel; 0 = Rep-Net's rule (5, or 3 where the tap map is <= 7 px)",
                      check=KERNEL_OR_RULE)
    groups: int = opt(2, "groups of the side modules' k x k conv (M_0 always uses 1)", check=AT_LEAST_ONE)


@METHODS.register("side_tuning", help="LST-style detached side network: zero backprop through the backbone")
class SideTuning(TransferModel):
    method = "side_tuning"
    Options = SideTuningOptions

    def build(self) -> None:
        o = self.options
        infos = self.backbone.describe(self.image_size)
        self.taps = self.backbone.stage_starts(self.image_size)
        widths = [make_divisible8(round(infos[b].out_channels * o.width)) for b in self.taps]
        downs, mods = [], []
        for j, b in enumerate(self.taps):
            info = infos[b]
            cin = 3 if j == 0 else widths[j - 1]
            mid = make_divisible8(cin)
            g = 1 if j == 0 or cin % o.groups or mid % o.groups else o.groups
            k = o.kernel or (3 if max(info.out_size) <= 7 else 5)
            mod = RepNetModule(cin, widths[j], k, g, mid, pool=4 if j == 0 else 2)
            # ``up`` (zero-initialised) already starts the model as the backbone; a zero gamma
            # here too would cut the chain's gradient (one link would open per optimiser step)
            nn.init.ones_(mod.bn2.weight)
            mods.append(mod)
            downs.append(Down(info.out_channels, widths[j]))
        self.side = nn.ModuleList(mods)
        self.down = nn.ModuleList(downs)
        self.up = nn.Linear(widths[-1], self.backbone.num_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        for j, b in enumerate(self.taps):
            self.attach(b, functools.partial(self._tap, j))

    def mark_trainable(self) -> None:
        super().mark_trainable()
        # a per-channel constant added to h_j (j < last) only enters M_{j+1}, whose batch-normalised
        # conv removes it: those biases would get no gradient; they stay 0
        for j in range(len(self.taps) - 1):
            self.down[j][1].bias.requires_grad_(False)
            self.side[j].bn2.bias.requires_grad_(False)

    def join_pre_logits(self, feats: torch.Tensor) -> torch.Tensor:
        # nothing in the backbone requires grad and the taps read detached features, so
        # autograd records no graph through the backbone: zero backprop through it
        return feats + self.up(torch.flatten(F.adaptive_avg_pool2d(self._state["h"], 1), 1))

    def _tap(self, j: int, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        f = out.detach()
        src = F.avg_pool2d(self._state["image"], 2) if j == 0 else self._state["h"]
        self._state["h"] = self.down[j](f) + self.side[j](src, f.shape[-2:])
        return out  # one-way: the backbone's own feature goes on unchanged
