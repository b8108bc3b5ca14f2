"""TinyTL (Cai et al., NeurIPS 2020): lite residual modules beside a frozen backbone.

``tinytl_l`` puts a lite residual module (Rep-Net's module with the block's stride, reading the
block's input, added to its output) beside every non-identity block from the first stage start on,
and trains them with the classifier; ``tinytl_lb`` also trains every backbone bias. The kernel follows
TinyTL's nominal-resolution rule. Unlike TinyTL's, the lite residuals are not ImageNet-pretrained (no
such weights here): BatchNorm with weight-standardised convs and a zero last gamma (TinyTL's
"RandomL"). docs/methods.md, "TinyTL-L and TinyTL-L+B".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from repnet.methods import METHODS
from repnet.methods.base import AT_LEAST_ONE, MethodOptions, ODD_KERNEL, POSITIVE, TransferModel, opt
from repnet.methods.bias import backbone_biases
from repnet.methods.repnet import RepNetModule, make_divisible8

NOMINAL_RESOLUTION = 128  # TinyTL's released rule: ``max_resolution = 128``


class LiteResidual(RepNetModule):
    """A Rep-Net module whose k x k conv carries the block's stride (TinyTL's lite residual)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, mid: int, pool: int, stride: int = 1,
                 norm: str = "batch"):
        super().__init__(cin, cout, kernel, groups, mid, pool, norm=norm)
        # odd kernels: timm's default padding (k // 2) is the same for stride 1 and 2
        self.conv1.stride = (stride, stride)


def lite_residual_kernels(strides: list[int], max_kernel: int = 5,
                          start: int = NOMINAL_RESOLUTION) -> list[tuple[int, int]]:
    """(kernel, pool) per block from the blocks' strides, by TinyTL's nominal-resolution rule."""
    out, res = [], start
    for s in strides:
        half = max(1, res // 2)
        res = max(1, res // s)
        if half == 1:
            out.append((1, 1))
            continue
        k = max_kernel
        while half < k:
            k -= 2
        out.append((k, 2))
    return out


@dataclass
class TinyTLOptions(MethodOptions):
    kernel: int = opt(5, "largest lite-residual kernel (shrunk by TinyTL's nominal-resolution rule)",
                      check=ODD_KERNEL)
    groups: int = opt(2, "groups of the lite residual's k x k conv", check=AT_LEAST_ONE)
    width: float = opt(1.0, "lite-residual width = round8(block input channels x width)", check=POSITIVE)
    norm: str = opt("batch", "the lite residuals' norm: batch, or group (TinyTL's GroupNorm; what --runtime "
                             "executorch trains)", ("batch", "group"))


class _TinyTL(TransferModel):
    Options = TinyTLOptions
    train_bias = False

    def build(self) -> None:
        o = self.options
        infos = self.backbone.describe(self.image_size)
        first = self.backbone.stage_starts(self.image_size)[0]
        blocks = [i for i in infos if i.index >= first and not i.identity]
        mods = []
        for info, (k, pool) in zip(blocks, lite_residual_kernels([i.stride for i in blocks], o.kernel)):
            cin = info.in_channels
            mid = make_divisible8(round(cin * o.width))
            g = o.groups if cin % o.groups == 0 and mid % o.groups == 0 else 1
            mods.append(LiteResidual(cin, info.out_channels, k, g, mid, pool, stride=info.stride, norm=o.norm))
        self.lite_blocks = [i.index for i in blocks]
        self.lite = nn.ModuleList(mods)
        for j, b in enumerate(self.lite_blocks):
            self.attach(b, functools.partial(self._add_lite, j))

    def trainable_backbone_parameters(self):
        return backbone_biases(self) if self.train_bias else iter(())

    def _add_lite(self, j: int, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.lite[j](x_in, out.shape[-2:])


@METHODS.register("tinytl_l", help="TinyTL-L: lite residual modules beside every block + classifier")
class TinyTLL(_TinyTL):
    method = "tinytl_l"


@METHODS.register("tinytl_lb", help="TinyTL-L+B: lite residual modules + backbone biases + classifier")
class TinyTLLB(_TinyTL):
    method = "tinytl_lb"
    train_bias = True

    def mark_trainable(self) -> None:
        super().mark_trainable()
        for m in self.lite:
            m.bn2.bias.requires_grad_(False)  # stays 0: the block's own bias trains instead
