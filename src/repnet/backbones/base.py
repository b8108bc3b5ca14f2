"""The uniform backbone surface every method is written against.

A :class:`Backbone` wraps an *unmodified* network (torchvision, timm, our own) and exposes
``forward_features(img)`` (the final feature map), ``forward_pre_logits(fmap)`` (the vector the new
classifier reads), ``block_names`` (its blocks, in execution order) and ``describe(image_size)``:
per-block metadata (channels, spatial size, stride, reduction, identity / residual flags) *measured*
by one dummy forward with hooks, never hand-written per backbone. Methods attach their trainable
side modules to blocks with forward hooks, so no method contains backbone-specific forward code
(docs/architecture.md, "Backbones and methods").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BlockInfo:
    index: int
    name: str  # module path inside ``Backbone.model``
    in_channels: int
    out_channels: int
    in_size: tuple[int, int]  # spatial size of the input at the probed image size
    out_size: tuple[int, int]
    stride: int  # in_size / out_size
    reduction: int  # image_size / out_size
    identity: bool  # the block returns its input unchanged (e.g. a ProxylessNAS zero block)
    residual: bool  # the block has a shortcut around it (holds its input while it runs)

    @property
    def changes_shape(self) -> bool:
        return self.stride > 1 or self.in_channels != self.out_channels


def has_shortcut(module: nn.Module) -> bool:
    """Whether a block adds a shortcut to its output (generic attribute conventions)."""
    for attr in ("use_res_connect", "has_skip", "has_residual"):
        if hasattr(module, attr):
            return bool(getattr(module, attr))
    if hasattr(module, "shortcut") and getattr(module, "shortcut") is not None:
        return True
    if hasattr(module, "downsample"):  # torchvision / timm ResNet blocks always add a shortcut
        return True
    if hasattr(module, "id_skip") and hasattr(module, "_block_args"):  # efficientnet-lite package
        a = module._block_args
        return bool(module.id_skip and a.stride == 1 and a.input_filters == a.output_filters)
    return False


class Backbone(nn.Module):
    """A frozen-able pretrained network with block metadata. Subclasses define the two forwards."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        block_names: list[str],
        num_features: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights: str | None = None,
    ):
        super().__init__()
        self.name = name
        self.model = model
        self.block_names = list(block_names)
        self.num_features = int(num_features)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.weights = weights  # a description of the weights that were loaded (or None = random)
        self._describe_cache: dict[int, list[BlockInfo]] = {}
        self.fingerprint = self.compute_fingerprint()

    # ---- the two forwards (per source family, never per method) ----
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_pre_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pre_logits(self.forward_features(x))

    # ---- structure ----
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.block_names]

    @torch.no_grad()
    def describe(self, image_size: int) -> list[BlockInfo]:
        """Measure per-block channels / sizes with one dummy forward at ``image_size``."""
        if image_size in self._describe_cache:
            return self._describe_cache[image_size]
        blocks = self.blocks()
        seen: dict[int, tuple] = {}
        handles = []
        for i, b in enumerate(blocks):
            def hook(mod, args, out, i=i):
                if i not in seen:
                    x = args[0]
                    seen[i] = (tuple(x.shape), tuple(out.shape), out is x)
            handles.append(b.register_forward_hook(hook))
        was_training = self.training
        p = next(self.model.parameters())
        try:
            self.eval()
            self.forward_features(torch.zeros(1, 3, image_size, image_size, dtype=p.dtype, device=p.device))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        infos = []
        for i, (name, b) in enumerate(zip(self.block_names, blocks)):
            if i not in seen:
                raise RuntimeError(f"backbone {self.name}: block {name} did not run in forward_features")
            xs, ys, same = seen[i]
            stride = max(1, round(xs[-1] / ys[-1]))
            infos.append(
                BlockInfo(
                    index=i, name=name, in_channels=xs[1], out_channels=ys[1],
                    in_size=(xs[-2], xs[-1]), out_size=(ys[-2], ys[-1]), stride=stride,
                    reduction=max(1, round(image_size / ys[-1])), identity=same,
                    residual=(not same) and has_shortcut(b),
                )
            )
        self._describe_cache[image_size] = infos
        return infos

    def stage_starts(self, image_size: int) -> list[int]:
        """Blocks where resolution or width changes, from the first block at reduction >= 4.

        These are the places where Rep-Net puts its connectors (docs/methods.md): for
        ProxylessNAS-Mobile blocks 1, 5, 9, 13, 17, 21.
        """
        out = []
        for info in self.describe(image_size):
            if info.identity or info.reduction < 4:
                continue
            if not out or info.changes_shape:
                out.append(info.index)
        return out

    def compute_fingerprint(self) -> str:
        """A short hash of the backbone's weights: identifies it in saved adapters."""
        h = hashlib.sha256(self.name.encode())
        for k, v in sorted(self.model.state_dict().items()):
            if "running" in k or "num_batches" in k:
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes()[:4096])
            h.update(str(float(v.float().sum())).encode() if v.numel() else b"")
        return h.hexdigest()[:16]


class SequentialBackbone(Backbone):
    """A backbone whose feature extractor is a list of top-level modules run in order.

    ``feature_modules`` and ``pre_logits_modules`` are module paths inside ``model``
    (e.g. torchvision MobileNetV2: ``["features"]`` and ``[]``; MobileNetV3-Large:
    ``["features"]`` and ``["classifier.0", "classifier.1"]``).
    """

    def __init__(self, *args, feature_modules: list[str], pre_logits_modules: list[str] = (), **kw):
        self.feature_modules = list(feature_modules)
        self.pre_logits_modules = list(pre_logits_modules)
        super().__init__(*args, **kw)

    def forward_features(self, x):
        for n in self.feature_modules:
            x = self.model.get_submodule(n)(x)
        return x

    def forward_pre_logits(self, fmap):
        x = super().forward_pre_logits(fmap)
        for n in self.pre_logits_modules:
            x = self.model.get_submodule(n)(x)
        return x
