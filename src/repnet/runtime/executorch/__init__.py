"""The ``executorch`` runtime: training steps in an ExecuTorch training program (``.pte``) on ExecuTorch's
own runtime, with its SGD. :mod:`.program` builds and exports the program, :mod:`.passes` and
:mod:`.planning` make it keep what the memory engine keeps, :mod:`.trainer` runs it from Python.

The runtime refuses in one line what a program cannot do (``--resume``, ``--int8``, gradient
accumulation, codebook weights, optimizers but SGD), and ``recipe.yaml`` gives SGD learning rates.
docs/runtime-executorch.md explains each part.
"""
from __future__ import annotations

from pathlib import Path

from repnet.runtime import RUNTIMES, Runtime, refuse


@RUNTIMES.register("executorch", help="an ExecuTorch training program on its runtime: eval-mode forward, its SGD "
                   "(momentum 0.9), one batch size")
class Executorch(Runtime):
    name = "executorch"
    recipe = str(Path(__file__).with_name("recipe.yaml"))
    profile_columns = (("analytic_planned_mb", "analytic planned MB"), ("program_planned_mb", "ExecuTorch planned MB"))
    tunes = False  # its SGD's rates come from its recipe

    def check(self, cfg, resume: bool = False) -> None:
        if resume:
            raise refuse(self.name, "--resume", "the runtime's SGD momentum lives in the program; start a new run")
        if cfg.int8:
            raise refuse(self.name, "--int8", "its SGD trains fp32 tensors")
        if cfg.accum_steps > 1:
            raise refuse(self.name, "--accum-steps", "its program updates the weights after every batch")
        if cfg.frozen_bits not in ("none", "linear"):
            raise refuse(self.name, f"--frozen-bits {cfg.frozen_bits}", "a program's frozen weights are linear int8 "
                         "(the runtime has no codebook lookup)")
        if cfg.optimizer != "sgd":
            raise refuse(self.name, f"--optimizer {cfg.optimizer}", "the runtime trains with its SGD (momentum 0.9)")

    def model_kwargs(self, cfg) -> dict:
        from repnet.runtime.executorch.program import program_build

        return program_build(cfg.method, cfg.options)  # the model its training program is exported from

    def trainer(self, model, cfg, schedule, say):
        from repnet.runtime.executorch.program import export_training_program
        from repnet.runtime.executorch.trainer import RuntimeTrainer

        say(f"exporting the ExecuTorch training program ({cfg.image_size}px, batch {cfg.batch_size}"
            f"{', portable kernels' if cfg.portable else ''}) ...")
        program = export_training_program(model, cfg.batch_size, cfg.image_size, cfg.label_smoothing,
                                          kernels=not cfg.portable)
        return RuntimeTrainer(model, program, cfg.lr, cfg.lr_side, momentum=0.9, weight_decay=cfg.weight_decay,
                              schedule=schedule)

    def profile(self, model, cfg, record: dict) -> dict:
        from repnet.runtime.executorch.program import analytic_planned_mb, program_memory

        return {**program_memory(model, cfg.batch_size, cfg.image_size, kernels=not cfg.portable),
                "analytic_planned_mb": analytic_planned_mb(record["analytic_peak_activation_mb"],
                                                           record["trainable_params"])}
