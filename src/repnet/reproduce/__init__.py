"""Reproducing the papers' tables: the Rep-Net paper's accuracy tables as data (:mod:`.tables`) and as
runs (:mod:`.runner`, ``repnet reproduce``), and TinyTL's published memory table through the analytic
model (:mod:`.tinytl_memory`).

No table has been run to completion here (the datasets and the official ProxylessNAS checkpoint are
not available offline); the harness plans, runs, resumes and collects them (docs/reproduce.md).
"""
from repnet.registry import lazy_exports

_EXPORTS = {"TABLES": "tables", "Cell": "tables", "Table": "tables", "select": "tables",
            "plan": "runner", "run_table": "runner", "collect": "runner", "train_command": "runner",
            "PUBLISHED": "tinytl_memory", "tinytl_configuration": "tinytl_memory"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
