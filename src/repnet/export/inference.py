"""Export a trained model for inference: ``torch.export`` programs (``.pt2``) and ONNX.

The exported file holds the whole inference model (frozen backbone, the method's trained modules, the
head; eval mode), made from a copy with the memory engine removed (8-bit frozen weights dequantised;
the arithmetic is unchanged), with a dynamic batch dimension. Every export is checked before it is
kept: the exported model runs on random images at two batch sizes and must agree with the eager model
(``max_abs_diff`` in the report); the file is written atomically. ONNX needs the ``onnx`` extra
(onnx, onnxscript, onnxruntime for the check). docs/export.md.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from repnet.errors import NonFinite, RepnetError
from repnet.storage import TMP_PREFIX, atomic_write, check_finite

__all__ = ["FORMATS", "export_model", "load_exported"]

FORMATS = ("pt2", "onnx")


def _inference_copy(model: nn.Module) -> nn.Module:
    from repnet.memory import engine_applied, remove_engine

    m = copy.deepcopy(model).cpu().eval()
    if engine_applied(m):
        remove_engine(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def load_exported(path: str | os.PathLike):
    """A callable ``f(images) -> logits`` for an exported file (``.pt2`` or ``.onnx``)."""
    path = Path(path)
    if not path.is_file():
        raise RepnetError(f"no exported model at {path}")
    if path.suffix == ".onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RepnetError("running an ONNX file needs onnxruntime: pip install 'repnet[onnx]'")
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0])
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise RepnetError(f"{path} is not a torch.export program: {str(e).strip().splitlines()[0]}") from None
    module = program.module()
    return lambda x: module(x)


def export_model(model: nn.Module, path: str | os.PathLike, format: str | None = None,
                 image_size: int | None = None, verify: bool = True, tol: float | None = None) -> dict:
    """Export ``model`` to ``path``; returns a report (format, bytes, max_abs_diff, ...).

    ``tol``: the largest accepted ``max |exported - eager| / max(1, max |eager|)`` (default
    1e-4 for ``pt2``, which runs PyTorch's own kernels; 1e-3 for ONNX Runtime's kernels).
    """
    path = Path(path)
    fmt = format or path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise RepnetError(f"unknown export format '{fmt}'; choose from: {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise RepnetError(f"ONNX export needs {', '.join(missing)}: pip install 'repnet[onnx]'")
    size = int(image_size or getattr(model, "image_size", 224))
    check_finite(model.state_dict(), f"{path}: the model's weights")  # a diverged model is never exported
    net = _inference_copy(model)
    example = torch.zeros(2, 3, size, size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    report: dict = {}

    def write(tmp_name: str) -> None:  # into the atomic writer's temporary file, checked before it is kept
        tmp = Path(tmp_name)
        if fmt == "pt2":
            program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, str(tmp))
        else:  # weights inside the file (no sidecar): the .onnx alone is the model
            torch.onnx.export(net, (example,), str(tmp), dynamo=True, dynamic_shapes=dynamic, external_data=False,
                              input_names=["images"], output_names=["logits"], verbose=False)
        report.update({"format": fmt, "path": str(path), "image_size": size, "bytes": tmp.stat().st_size,
                       "params": sum(p.numel() for p in net.parameters()), "max_abs_diff": None})
        if verify and not (fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None):
            run = load_exported(tmp)
            g = torch.Generator().manual_seed(0)
            diff, scale = 0.0, 1.0
            for batch in (1, 3):
                x = torch.randn(batch, 3, size, size, generator=g)
                with torch.no_grad():
                    ref = net(x)
                    got = run(x)
                if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())):
                    raise NonFinite(f"the {'eager' if not bool(torch.isfinite(ref).all()) else 'exported'} model's "
                                    "outputs are non-finite (NaN / inf) on test images: it is not verified, nothing "
                                    "was written")
                diff = max(diff, (got.float() - ref.float()).abs().max().item())
                scale = max(scale, ref.abs().max().item())
            limit = (tol if tol is not None else 1e-4 if fmt == "pt2" else 1e-3) * scale
            if not diff <= limit:
                raise RepnetError(f"the exported model disagrees with the eager one (max |diff| {diff:.3g} "
                                  f"> {limit:.3g}); nothing was written")
            report["max_abs_diff"] = diff

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepnetError(f"cannot create {path.parent}: {e.strerror or e}") from None
    atomic_write(path, write)
    for stray in path.parent.glob(f"{TMP_PREFIX}*{path.name}*"):  # an exporter's sidecar of the temp file
        stray.unlink(missing_ok=True)
    return report


