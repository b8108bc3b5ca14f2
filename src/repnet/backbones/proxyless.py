"""ProxylessNAS-Mobile (Cai et al., ICLR 2019): the backbone of the Rep-Net and TinyTL papers.

Our own definition, with module names that match the official checkpoint format of
mit-han-lab's ``proxyless_mobile`` (``first_conv.conv.weight``,
``blocks.5.mobile_inverted_conv.depth_conv.bn.weight``, ``feature_mix_layer.conv.weight``,
``classifier.linear.weight``, ...), so an official checkpoint loads with strict key matching.
No offline copy of the weights exists; random init unless a file (or URL, online) is given.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from repnet.backbones import BACKBONES
from repnet.backbones import weights as W
from repnet.backbones.base import Backbone

# (out channels, stride, kernel, expand ratio) for the 22 MB-blocks; None = zero block.
# The papers' stage table (docs/methods.md, "The backbone: ProxylessNAS-Mobile").
PROXYLESS_MOBILE_BLOCKS: list[tuple[int, int, int, int] | None] = [
    (16, 1, 3, 1),
    (32, 2, 5, 3), (32, 1, 3, 3), None, None,
    (40, 2, 7, 3), (40, 1, 3, 3), (40, 1, 5, 3), (40, 1, 5, 3),
    (80, 2, 7, 6), (80, 1, 5, 3), (80, 1, 5, 3), (80, 1, 5, 3),
    (96, 1, 5, 6), (96, 1, 5, 3), (96, 1, 5, 3), (96, 1, 5, 3),
    (192, 2, 7, 6), (192, 1, 7, 6), (192, 1, 7, 3), (192, 1, 7, 3),
    (320, 1, 7, 6),
]

OFFICIAL_URL = "https://hanlab.mit.edu/files/proxylessNAS/proxyless_mobile.pth"
BN_EPS = 1e-3
BN_MOMENTUM = 0.1


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = OrderedDict(
        conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
    )
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


class MBInvertedConv(nn.Module):
    #: its children run in order, each output read only by the next (the memory engine may fuse the
    #: expansion with the depthwise conv: repnet.memory.ops.fused)
    engine_chain = True

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = round(cin * expand)
        self.inverted_bottleneck = conv_bn(cin, mid, 1) if expand != 1 else None
        self.depth_conv = conv_bn(mid, mid, k, stride, groups=mid)
        self.point_linear = conv_bn(mid, cout, 1, act=False)

    def forward(self, x):
        # each result rebinds ``x``: a layer's input is freed once the next layer has it (a nested
        # call would hold the expanded map through the projection)
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        x = self.depth_conv(x)
        return self.point_linear(x)


class MobileInvertedResidualBlock(nn.Module):
    """An MB-block; ``mobile_inverted_conv is None`` is a zero block (identity)."""

    def __init__(self, mobile_inverted_conv: MBInvertedConv | None, shortcut: bool):
        super().__init__()
        self.mobile_inverted_conv = mobile_inverted_conv
        self.shortcut = nn.Identity() if shortcut else None

    def forward(self, x):
        if self.mobile_inverted_conv is None:
            return x
        y = self.mobile_inverted_conv(x)
        return y + x if self.shortcut is not None else y


class ProxylessNASMobile(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.first_conv = conv_bn(3, 32, 3, stride=2)
        blocks, cin = [], 32
        for cfg in PROXYLESS_MOBILE_BLOCKS:
            if cfg is None:
                blocks.append(MobileInvertedResidualBlock(None, shortcut=True))
                continue
            cout, stride, k, e = cfg
            shortcut = stride == 1 and cin == cout
            blocks.append(MobileInvertedResidualBlock(MBInvertedConv(cin, cout, k, stride, e), shortcut))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.feature_mix_layer = conv_bn(cin, 1280, 1)
        self.classifier = nn.Sequential(OrderedDict(dropout=nn.Dropout(dropout), linear=nn.Linear(1280, num_classes)))
        self.num_features = 1280
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        return self.feature_mix_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        return self.classifier(x)


# ---------------------------------------------------------------- registration
class ProxylessBackbone(Backbone):
    def forward_features(self, x):
        return self.model.forward_features(x)


@BACKBONES.register("proxylessnas_mobile", help="ProxylessNAS-Mobile (paper backbone); official checkpoint from a file/URL")
def proxylessnas_mobile(pretrained=True) -> Backbone:
    model = ProxylessNASMobile()
    src = W.resolve(pretrained, "proxylessnas_mobile", None, f"official checkpoint: {OFFICIAL_URL}")
    if src == "official":
        src = OFFICIAL_URL
    if src:
        W.load_into(model, src, "proxylessnas_mobile", ignore_prefixes=("classifier.",))
    model.classifier = nn.Identity()  # the ImageNet head is never used
    return ProxylessBackbone(
        "proxylessnas_mobile", model, [f"blocks.{i}" for i in range(len(model.blocks))], 1280, weights=src
    )
