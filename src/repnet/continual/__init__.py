"""Multi-domain / continual learning over one frozen backbone: the multi-task model and its disk format
(:mod:`.model`), the task sequence behind ``repnet continual`` (:mod:`.sequence`), its metrics
(:mod:`.metrics`), and the continual methods that are more than an adapter per task (:mod:`.methods`,
Hyb-Learn).

Every transfer method that trains no backbone tensor is a continual method as it is (one adapter per
task); docs/continual.md explains how tasks share the backbone and what was measured.
"""
from repnet.registry import lazy_exports

_EXPORTS = {"MultiTaskModel": "model", "FORMAT": "model", "continual_metrics": "metrics", "format_matrix": "metrics",
            "train_sequence": "sequence", "parse_tasks": "sequence", "RUN": "sequence",
            "CONTINUAL_METHODS": "methods"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
