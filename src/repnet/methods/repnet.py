"""Rep-Net (Yang, Rakin, Fan, CVPR 2022): a tiny Reprogramming Network beside a frozen backbone.

Q small modules (:class:`RepNetModule`: AvgPool -> WS-conv k x k -> norm -> ReLU -> WS-conv 1x1 ->
norm with gamma 0 -> resize) sit where the backbone changes resolution or width
(``Backbone.stage_starts``); module 1 reads the image pooled by 2, module j > 1 the backbone feature
entering its block and/or the previous module's output. Features are exchanged through additive
connectors (``none``, ``down``, ``up``, ``dual``), whose backward keeps nothing, and the zero gamma
makes the model start as the frozen backbone. The module, the connectors and the recipe:
docs/methods.md, "Rep-Net".
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn

from repnet.methods import METHODS
from repnet.methods.bias import backbone_biases
from repnet.methods.base import AT_LEAST_ONE, KERNEL_OR_RULE, MethodOptions, POSITIVE, TransferModel, opt


def make_divisible8(c: int) -> int:
    return max(8, int(round(c / 8)) * 8) if c % 8 else c


def module_norm(kind: str, channels: int) -> nn.Module:
    """A module's norm: ``batch`` (the paper's BatchNorm: batch statistics while training) or
    ``group`` (GroupNorm, 8 groups where the width allows: the same computation in training and in
    eval mode, so a training program for a device runtime, which runs with fixed statistics,
    trains the model that eager PyTorch trains)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels, eps=1e-3)
    return nn.BatchNorm2d(channels, eps=1e-3)


class RepNetModule(nn.Module):
    """AvgPool(d) -> WS-conv kxk (groups g) -> norm -> ReLU -> WS-conv 1x1 -> norm(gamma=0) -> resize."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, mid: int, pool: int, ws: bool = True,
                 zero_init: bool = True, norm: str = "batch"):
        super().__init__()
        # a module (not F.avg_pool2d) so that the memory engine makes its backward keep nothing
        self.pool = nn.AvgPool2d(pool) if pool > 1 else None
        conv = functools.partial(StdConv2d, eps=1e-5) if ws else nn.Conv2d
        self.conv1 = conv(cin, mid, kernel, groups=groups, bias=False, padding=kernel // 2)
        self.bn1 = module_norm(norm, mid)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(mid, cout, 1, bias=False)
        self.bn2 = module_norm(norm, cout)
        for m in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if zero_init:
            nn.init.zeros_(self.bn2.weight)  # the network starts as the backbone

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.pool is not None and min(x.shape[-2:]) >= self.pool.kernel_size:
            x = self.pool(x)  # (skipped on maps smaller than the pool: tiny test resolutions)
        x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


@dataclass
class RepNetOptions(MethodOptions):
    connector: str = opt("dual", "feature exchange with the backbone", ("none", "down", "up", "dual"))
    placement: str = opt("stages", "connectors at stage starts (paper) or at every block", ("stages", "all"))
    train_bias: bool = opt(True, "also train the backbone's biases (the paper's '+bias' mode)")
    kernel: int = opt(0, "module kernel size; 0 = the paper's rule (5, or 3 where the connector map is <= 7 px)",
                      check=KERNEL_OR_RULE)
    groups: int = opt(2, "groups of the kxk conv (module 1 always uses 1)", check=AT_LEAST_ONE)
    width: float = opt(1.0, "module width = round8(input channels x width)", check=POSITIVE)
    ws: bool = opt(True, "weight standardisation in the module convs (paper)")
    zero_init: bool = opt(True, "each module's last norm starts with gamma = 0: the model starts as the backbone "
                                "(paper)")
    norm: str = opt("batch", "the modules' norm: batch (paper) or group (GroupNorm: what --runtime executorch "
                             "trains, as it runs norms without batch statistics)", ("batch", "group"))
    image_pool: int = opt(2, "module 1 reads the image average-pooled by this factor (paper: 2; 1 = full image)",
                          check=AT_LEAST_ONE)


@METHODS.register("repnet", help="Rep-Net: tiny reprogramming network + additive connectors (CVPR 2022)")
class RepNet(TransferModel):
    method = "repnet"
    Options = RepNetOptions

    def build(self) -> None:
        o = self.options
        infos = self.backbone.describe(self.image_size)
        starts = self.backbone.stage_starts(self.image_size)
        if o.placement == "all":
            starts = [i.index for i in infos if i.index >= starts[0] and not i.identity]
        self.connectors = starts
        mods = []
        for j, b in enumerate(starts):
            info = infos[b]
            cin = 3 if j == 0 else info.in_channels
            mid = make_divisible8(round(cin * o.width))
            g = 1 if j == 0 or cin % o.groups or mid % o.groups else o.groups
            k = o.kernel or (3 if max(info.out_size) <= 7 else 5)
            mods.append(RepNetModule(cin, info.out_channels, k, g, mid, pool=4 if j == 0 else 2, ws=o.ws,
                                     zero_init=o.zero_init, norm=o.norm))
        self.repnet = nn.ModuleList(mods)
        self._last_block = len(infos) - 1
        for j, b in enumerate(starts):
            self.attach(b, functools.partial(self._connect, j))
        if starts[-1] != self._last_block and o.connector in ("none", "up"):
            self.attach(self._last_block, self._join_at_head)

    def trainable_backbone_parameters(self):
        return backbone_biases(self) if self.options.train_bias else iter(())

    def _connect(self, j: int, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c = self.options.connector
        if j == 0:
            src = self._module1_input(self._state["image"])
        elif c in ("none", "down"):
            src = self._state["p"]
        elif c == "up":
            src = x_in + self._state["p"]
        else:  # dual: the merged feature entering this block
            src = x_in
        p = self.repnet[j](src, out.shape[-2:])
        self._state["p"] = p
        if c in ("down", "dual"):
            return out + p
        if j == len(self.repnet) - 1 and self.connectors[j] == self._last_block:
            return out + p  # none / up: the Rep-Net output joins at the head
        return out

    def _module1_input(self, img: torch.Tensor) -> torch.Tensor:
        """Module 1 reads the image average-pooled by ``image_pool`` (the paper: 2)."""
        return F.avg_pool2d(img, self.options.image_pool) if self.options.image_pool > 1 else img

    def analytic_prelude(self, img: torch.Tensor) -> list[nn.Module]:
        """The paper's execution order for the memory model (``analyze(order="paper")``): module 1
        runs on the pooled image before the backbone's stem. Returns the modules it ran."""
        src = self._module1_input(img)
        size = self.backbone.describe(self.image_size)[self.connectors[0]].out_size
        self.repnet[0](src, tuple(size))
        return [self.repnet[0]]

    def _join_at_head(self, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self._state["p"]
