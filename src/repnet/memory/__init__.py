"""Training memory: the engine (frozen layers keep nothing), measurement and the analytic model."""
from .engine import apply_engine, engine_applied, remove_engine, set_step_backward

__all__ = ["apply_engine", "remove_engine", "engine_applied", "set_step_backward"]
