"""The default runtime: training steps in PyTorch, frozen layers on the memory engine (``repnet.memory``).

It overrides nothing of :class:`repnet.runtime.Runtime`: the model is built as ``get_model`` builds it
(memory mode, method options, frozen bits from the config), it refuses nothing, and it has no trainer
of its own, so the loop (:func:`repnet.training.loop.fit`) takes the steps with its own optimizer and
schedule.
"""
from __future__ import annotations

from repnet.runtime import RUNTIMES, Runtime, refuse


@RUNTIMES.register("eager", help="PyTorch with the memory engine (the default)")
class Eager(Runtime):
    name = "eager"

    def check(self, cfg, resume: bool = False) -> None:
        if cfg.portable:
            raise refuse(self.name, "--portable", "it chooses the kernels of an ExecuTorch program (--runtime "
                         "executorch or device)")

