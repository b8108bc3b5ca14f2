"""ProvIoT: on-device provenance anomaly detection, trained on the device and federated on Flower.

Mukherjee et al., ACNS 2024 ("Detecting Stealthy Attacks in IoT through Federated Edge-Cloud
Security"), after ProvDetector (Wang et al., NDSS 2020). One module per concern:

* :mod:`.collect` - strace and auditd behind one interface; the trace file;
* :mod:`.graph` - the provenance graph of a window;
* :mod:`.paths` - frequency database, regularity scores, the K rarest causal paths, paragraphs;
* :mod:`.embed` - path vectors (feature hashing, or doc2vec PV-DM via gensim);
* :mod:`.detector` - the autoencoder trained through :func:`repnet.training.loop.fit`, thresholds, model folders;
* :mod:`.federated` - the Flower ServerApp / ClientApp (only the autoencoder's tensors travel);
* :mod:`.textpaths` - causal paths given as text (benign / anomaly files of other collectors);
* :mod:`.workloads` - benign IoT-like workloads and harmless attack emulations;
* :mod:`.monitor` - steady-state summarisation + detection without torch.

The names below load on first use, so ``import repnet.proviot`` costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "collector": "collect", "load_trace": "collect", "save_trace": "collect", "parse_strace": "collect",
    "Trace": "collect", "ProvGraph": "graph", "window_graphs": "graph", "FrequencyDB": "paths",
    "rarest_paths": "paths", "regularity": "paths", "Path": "paths", "make_embedder": "embed",
    "DetectorSettings": "detector", "Detector": "detector", "train_detector": "detector", "evaluate": "detector",
    "save_model": "detector", "load_model": "detector", "load_numpy_detector": "detector",
    "read_paths": "textpaths", "write_paths": "textpaths", "train_text_detector": "textpaths",
    "score_text_paths": "textpaths", "plan_session": "workloads", "run_session": "workloads",
    "FleetSettings": "federated", "simulate": "federated", "evaluate_fleet": "federated",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repnet.proviot' has no attribute '{name}'")
