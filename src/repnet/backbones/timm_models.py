"""Any timm CNN as ``timm:<name>``: its blocks found from timm's own ``feature_info`` (no per-family
code), weights from a file (timm's hub is never fetched).

One prefix registration covers every timm model that reports its stages (EfficientNet, ResNet,
RegNet, ConvNeXt, ...): the blocks of each stage are listed in execution order, the pre-logits are
timm's own ``forward_head(pre_logits=True)``, and the per-block metadata is measured as for every
backbone (backbones/base.py).
"""
from __future__ import annotations

import torch
from torch import nn

from repnet.backbones import BACKBONES
from repnet.backbones import weights as W
from repnet.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from repnet.errors import RepnetError


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
