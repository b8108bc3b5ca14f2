"""The default runtime: training steps in PyTorch, frozen layers on the memory engine (``repnet.memory``)."""
from __future__ import annotations

from repnet.runtime import RUNTIMES, Runtime


@RUNTIMES.register("eager", help="PyTorch with the memory engine (the default)")
class Eager(Runtime):
    name = "eager"

