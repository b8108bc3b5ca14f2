"""The ``device`` runtime: training in ``repnet-device``, the C++ trainer over the ExecuTorch runtime
(sources in ``device/``, docs/device.md), with the recipe's optimizer (Adam / AdamW / SGD) and schedule
and no Python in the training process. :mod:`.files` writes what it reads (program metadata, packed
datasets); :mod:`.runner` prepares a run folder, runs the process and collects its figures.
"""
from __future__ import annotations

from repnet.runtime import RUNTIMES, refuse
from repnet.runtime.executorch import Executorch


@RUNTIMES.register("device", help="repnet-device, the C++ trainer over the same kind of ExecuTorch program: the "
                   "recipe's Adam and schedule, no Python in the training process (built by scripts/setup.sh)")
class Device(Executorch):
    """The program is the executorch runtime's (same model, same passes, same profile column); the
    trainer is a separate C++ process with its own run folder and checkpoints."""

    name = "device"
    recipe = None  # the dataset's recipe as it is: the device has Adam
    tunes = False

    def check(self, cfg, resume: bool = False) -> None:
        for bad, what, why in (
                (cfg.int8, "--int8", "the device trains fp32 tensors"),
                (cfg.accum_steps > 1, "--accum-steps", "the program updates the weights after every batch"),
                (cfg.frozen_bits not in ("none", "linear"), f"--frozen-bits {cfg.frozen_bits}",
                 "a program's frozen weights are linear int8"),
                (cfg.select_best_on != "none", f"select_best_on={cfg.select_best_on}", "the device reports the final "
                 "epoch"),
                (cfg.weight_decay_side is not None, "--weight-decay-side", "the device decays every group alike"),
                (cfg.tune is True, "--tune", "the trials run in eager PyTorch; tune there, then train with the chosen "
                 "rate")):
            if bad:
                raise refuse(self.name, what, why)

    def trainer(self, model, cfg, schedule, say):
        raise AssertionError("the device runtime runs whole trainings (Device.run)")

    def run(self, cfg, ctx, resume=None, overwrite=False):
        from repnet.runtime.device.runner import train_on_device

        return train_on_device(cfg, ctx, resume=resume, overwrite=overwrite)
