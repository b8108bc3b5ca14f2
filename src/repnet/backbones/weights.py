"""Loading pretrained weights: offline packages, user files, official URLs (when online).

:func:`resolve` turns a ``pretrained`` argument (True: the offline weights where a package ships
them; False: random init; a path or URL) into the one source to read, or a one-line error naming what
is missing; :func:`read_state_dict` reads a checkpoint safely (weights-only ``torch.load``, or
safetensors); :func:`load_into` loads it with strict key matching, so a checkpoint of another network
is refused rather than half-loaded.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from repnet.errors import RepnetError
from repnet.storage import load_torch_file, non_finite, read_safetensors


def package_file(package: str, relpath: str) -> str | None:
    """Path of a data file shipped inside an installed package (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / relpath
        if p.is_file():
            return str(p)
    return None


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint from a file path (.pth/.pt/.tar/.safetensors) or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            sd = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise RepnetError(f"could not download weights from {source}: {e}") from e
    else:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            raise RepnetError(f"weights file not found: {source}")
        if path.endswith(".safetensors"):
            sd = read_safetensors(path, "weights file")
        else:
            sd = load_torch_file(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise RepnetError(f"{source} does not hold a state dict")
    bad = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise RepnetError(f"{source} does not hold a state dict: entry {str(bad)[:60]!r} is not a named tensor")
    if non_finite(sd) is not None:
        raise RepnetError(f"weights file {source} holds non-finite values ({non_finite(sd)}): damaged weights")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_into(model: nn.Module, source: str, backbone: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Strictly load ``source`` into ``model``; a checkpoint for another model is one clear error."""
    sd = read_state_dict(source)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in sd and not k.startswith(ignore_prefixes) and "num_batches_tracked" not in k]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise RepnetError(f"checkpoint {source} is not a {backbone} checkpoint: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


def resolve(pretrained, backbone: str, offline: str | None, offline_hint: str = "") -> str | None:
    """Turn the ``pretrained`` argument into a weights source (None = random init)."""
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        if offline is None:
            hint = f" ({offline_hint})" if offline_hint else ""
            raise RepnetError(
                f"no offline pretrained weights for backbone '{backbone}'{hint}; "
                "pass pretrained=<checkpoint file or URL> (CLI: --weights PATH) or pretrained=False"
            )
        return offline
    return str(pretrained)
