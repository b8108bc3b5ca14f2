"""Where TinyTL's published memory figures come from, reproduced row by row.

TinyTL's table (ProxylessNAS-Mobile, batch 8, 224 px: FT-Last 30.8, TinyTL-B 31.7, TinyTL-L 37.1,
TinyTL-L+B 37.1, FT-Norm+Last 192.4, FT-Full 390.8 MB) matches our own methods only for L+B. Two
properties of TinyTL's released training script explain every other row: it profiles *one* network
for every method (ProxylessNAS-Mobile with the 19 lite residual modules always inserted), and its
profiler counts every activation mask once anything trains. :func:`tinytl_configuration` rebuilds
that configuration from our modules and :func:`reproduce` evaluates it: every row within 0.05 MB.
docs/memory.md, "Where TinyTL's published figures come from".
"""
from __future__ import annotations

from torch import nn

from repnet.errors import RepnetError
from repnet.memory.analytic import AnalyticReport, analyze

__all__ = ["PUBLISHED", "TINYTL_METHODS", "tinytl_configuration", "reproduce"]

# TinyTL paper, ProxylessNAS-Mobile, batch 8, MB (1e6 bytes): {method: {image_size: MB}}
PUBLISHED: dict[str, dict[int, float]] = {
    "last": {224: 30.8},
    "bias": {224: 31.7},
    "tinytl_l": {224: 37.1},
    "tinytl_lb": {224: 37.1, 320: 64.7},
    "norm_last": {224: 192.4},
    "full": {224: 390.8},
}

# our method name -> TinyTL's --transfer_learning_method and the flags its script sets
TINYTL_METHODS: dict[str, tuple[str, dict[str, bool]]] = {
    "last": ("last", {}),
    "bias": ("tinytl-bias", {"bias": True}),
    "tinytl_l": ("tinytl-lite_residual", {"lite": True}),
    "tinytl_lb": ("tinytl-lite_residual+bias", {"bias": True, "lite": True}),
    "norm_last": ("bn+last", {"norm": True}),
    "full": ("full", {"full": True}),
}

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def tinytl_configuration(method: str, image_size: int = 224, num_classes: int = 102,
                         backbone: str = "proxylessnas_mobile") -> tuple[nn.Module, bool]:
    """The network TinyTL's script profiles for ``method``, and its ``require_backward``.

    A ``tinytl_l`` model (backbone + lite residuals + head, random weights) with
    ``requires_grad`` set as the script sets it: everything frozen, then the head; ``full``:
    everything; ``norm_last``: every norm (backbone and lite residuals); ``bias``: every
    bias (lite residuals' included); ``tinytl_l`` / ``tinytl_lb``: the lite residuals, whose
    last-norm bias stays frozen when biases or norms also train.
    """
    from repnet.api import get_model

    if method not in TINYTL_METHODS:
        raise RepnetError(f"TinyTL published no figure for '{method}'; choose from: {', '.join(TINYTL_METHODS)}")
    flags = TINYTL_METHODS[method][1]
    model = get_model(backbone, "tinytl_l", num_classes=num_classes, image_size=image_size,
                      pretrained=False, memory="vanilla")
    for p in model.parameters():
        p.requires_grad_(flags.get("full", False))
    for p in model.head.parameters():
        p.requires_grad_(True)
    if flags.get("norm"):
        for m in model.modules():
            if isinstance(m, _NORMS):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    if flags.get("bias"):
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    if flags.get("lite"):
        for lite in model.lite:
            for p in lite.parameters():
                p.requires_grad_(True)
            if flags.get("bias") or flags.get("norm"):
                lite.bn2.bias.requires_grad_(False)
    return model, any(flags.values())


def reproduce(image_sizes=(224, 320), batch_size: int = 8, num_classes: int = 102) -> list[dict]:
    """One row per (method, image size): published, our method, TinyTL's configuration (MB)."""
    from repnet.api import get_model

    rows = []
    for method in TINYTL_METHODS:
        for size in image_sizes:
            ours: AnalyticReport = analyze(get_model("proxylessnas_mobile", method, num_classes=num_classes,
                                                     image_size=size, pretrained=False, memory="vanilla"), size)
            model, require_backward = tinytl_configuration(method, size, num_classes)
            ref = analyze(model, size, masks="always" if require_backward else "gradient")
            published = PUBLISHED[method].get(size)
            rows.append({
                "method": method,
                "tinytl_name": TINYTL_METHODS[method][0],
                "image_size": size,
                "batch_size": batch_size,
                "published_mb": published,
                "ours_mb": round(ours.total_mb(batch_size), 3),
                "ours_params_mb": round(ours.param_bytes / 1e6, 3),
                "tinytl_config_mb": round(ref.total_mb(batch_size), 3),
                "tinytl_config_params_mb": round(ref.param_bytes / 1e6, 3),
                "tinytl_config_peak_layer": ref.peak_layer,
                "difference_mb": None if published is None else round(ref.total_mb(batch_size) - published, 3),
            })
    return rows
