"""Training: the one loop every workflow trains through (:mod:`.loop`), ``repnet train``'s run with its
folder, checkpoints and resume (:mod:`.run`), ``repnet plan``'s search for what fits a memory budget
(:mod:`.planner`), and the memory profile of a configuration (:mod:`.profile`).

:mod:`.tune` chooses a learning rate on the validation split (``--tune``). docs/training.md is the
guide; docs/plan.md the planner's.
"""
from repnet.registry import lazy_exports

_EXPORTS = {"fit": "loop", "evaluate": "loop", "make_optimizer": "loop", "CosineSchedule": "loop",
            "train": "run", "resume_config": "run", "memory_profile": "run", "MEMORY_KEYS": "run", "RUN": "run",
            "plan": "planner", "parse_budget": "planner", "format_plan": "planner", "measure_peak_mb": "planner",
            "profile_one": "profile"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
