"""The default runtime: training steps in PyTorch, frozen layers on the memory engine (``repnet.memory``)."""
from __future__ import annotations

from repnet.runtime import RUNTIMES, Runtime, refuse


@RUNTIMES.register("eager", help="PyTorch with the memory engine (the default)")
class Eager(Runtime):
    name = "eager"

    def check(self, cfg, resume: bool = False) -> None:
        if cfg.portable:
            raise refuse(self.name, "--portable", "it chooses the kernels of an ExecuTorch program (--runtime "
                         "executorch or device)")

