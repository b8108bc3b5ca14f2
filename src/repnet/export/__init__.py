"""Export for inference: a trained model as a ``torch.export`` program (``.pt2``) or ONNX, checked
against the eager model before it is kept (:mod:`.inference`).

Training programs for a device runtime are exported by that runtime (:mod:`repnet.runtime.executorch`).
docs/export.md is the guide.
"""
from repnet.registry import lazy_exports

_EXPORTS = {"export_model": "inference", "load_exported": "inference", "FORMATS": "inference"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
