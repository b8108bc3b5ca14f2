"""TinyTL (Cai et al., NeurIPS 2020): lite residual modules beside a frozen backbone.

* ``tinytl_l``: a lite residual module beside every non-identity block from the first
  stage start on (ProxylessNAS-Mobile: blocks 1..21 minus the zero blocks 3, 4 -> 19
  modules) + the classifier train; the backbone is completely frozen.
* ``tinytl_lb`` (L+B): the same, and every backbone bias trains too; the lite residual's
  last-norm bias stays frozen (the block's own trainable bias already covers it).

A lite residual reads the block's *input* and is added to the block's output::

    AvgPool 2 -> WS-conv k x k (groups 2, width round8(C_in), stride = the block's stride)
    -> norm -> ReLU -> WS-conv 1x1 to C_out -> norm (gamma = 0) -> bilinear resize

This is :class:`~repnet.methods.repnet.RepNetModule` with the block's stride, so both
methods share one building block.

Kernel rule (TinyTL's released code): a nominal resolution starts at 128 and halves at each
stride-2 block; a module sees half of it (after its AvgPool 2), and its kernel shrinks by 2
from 5 while that half is below the kernel (a half of 1 gives a 1x1 kernel and no pooling).
On ProxylessNAS-Mobile this gives k = 5 on blocks 1..17 and k = 3 on blocks 18..21.

Departures from TinyTL, documented: TinyTL used GroupNorm with weight standardisation and
lite residuals *pretrained on ImageNet*. No such weights exist here, so, as Rep-Net does, the
norms are BatchNorm (eps 1e-3) with weight-standardised convs and the last norm's gamma
starts at 0 (TinyTL's "RandomL" variant): at initialisation the model computes exactly the
frozen backbone with the new head.
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
