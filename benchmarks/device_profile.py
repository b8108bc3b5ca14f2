"""Where a training program's step goes: per-operator times from ExecuTorch's profiler (ETDump).

Exports one method x backbone training program (as ``repnet train --runtime executorch`` builds
it: frozen weights in 8 bits), with repnet's kernels (default) or the portable program
(``--portable``), runs ``--steps`` forward_backward calls on the runtime with ETDump on (the
first one a warm-up), and reports the last step's time per operator, and per operator and
shape (the program's instructions tell which), largest first:

    python benchmarks/device_profile.py --backbone mobilenet_v2 --method bias            # 224 px, batch 8
    python benchmarks/device_profile.py --portable --out benchmarks/results/device_profile_portable.json

Timings are wall-clock on a possibly shared CPU; the shares are what to read.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import types

import torch

import repnet
from common import command_line, write_results
from repnet.runtime.executorch.program import export_training_program, program_build


def _etdump_reader():
    """executorch.devtools.etdump's reader without executorch.devtools' __init__ (which imports
    its Inspector and, with it, pandas)."""
    import executorch

    if "executorch.devtools" not in sys.modules:
        pkg = types.ModuleType("executorch.devtools")
        pkg.__path__ = [os.path.join(list(executorch.__path__)[0], "devtools")]
        sys.modules["executorch.devtools"] = pkg
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc

    return deserialize_from_etdump_flatcc


def _instructions(buffer: bytes) -> list[tuple[str, str]]:
    """(operator, argument shapes) of each instruction of the program's first chain."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import KernelCall, Tensor

    prog = deserialize_pte_binary(buffer).program
    plan = prog.execution_plan[0]
    out = []
    for ins in plan.chains[0].instructions:
        a = ins.instr_args
        if not isinstance(a, KernelCall):
            out.append((type(a).__name__, ""))
            continue
        op = plan.operators[a.op_index]
        shapes = [("x".join(map(str, v.val.sizes)) or "()") for v in (plan.values[i] for i in a.args)
                  if isinstance(v.val, Tensor)]
        out.append((f"{op.name}.{op.overload}" if op.overload else op.name, " ".join(shapes)))
    return out


def profile_program(buffer: bytes, batch: int, size: int, steps: int = 2, threads: int = 1) -> dict:
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from repnet.runtime.executorch.kernels import set_runtime_threads

    set_runtime_threads(threads)
    read = _etdump_reader()
    mod = _load_for_executorch_from_buffer(buffer, enable_etdump=True, debug_buffer_size=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.zeros(batch, dtype=torch.long)
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        mod.run_method("forward", (x, y))
        wall.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.etdp")
        mod.write_etdump_result_to_file(path)
        with open(path, "rb") as f:
            dump = read(f.read())
    instructions = _instructions(buffer)
    by_op, by_shape = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for ev in dump.run_data[-1].events or []:
        p = ev.profile_event
        if p is None or p.name in ("Method::execute", "Program::load_method", "OPERATOR_CALL"):
            continue
        ms = (p.end_time - p.start_time) / 1e6
        op, shapes = instructions[p.instruction_id] if 0 <= p.instruction_id < len(instructions) else (p.name, "")
        by_op[op] += ms
        calls[op] += 1
        by_shape[(op, shapes)] += ms
    total = sum(by_op.values())
    return {"step_s": wall[-1], "steps_s": wall, "ops_ms": total,
            "by_op": [{"op": k, "calls": calls[k], "ms": v, "share": v / total if total else 0.0}
                      for k, v in by_op.most_common()],
            "by_op_and_shape": [{"op": k[0], "shapes": k[1], "ms": v} for k, v in by_shape.most_common(40)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--method", default="bias")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=102)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--portable", action="store_true", help="the portable program (ExecuTorch's kernels only)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None, help="write the profile here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    build = program_build(args.method)
    model = repnet.get_model(args.backbone, args.method, args.num_classes, image_size=args.image_size,
                             pretrained=False, **build).eval()
    t = time.time()
    prog = export_training_program(model, args.batch_size, args.image_size, kernels=not args.portable)
    export_s = time.time() - t
    if prog.kernels:
        from repnet.runtime.executorch.kernels import load_kernels

        load_kernels()
    res = profile_program(prog.buffer, args.batch_size, args.image_size, args.steps, args.threads)
    print(f"{args.backbone} {args.method} {args.image_size}px batch {args.batch_size}, {args.threads} thread(s), "
          f"{'portable' if args.portable else 'repnet kernels'}: step {res['step_s']:.3f} s (ops {res['ops_ms']:.0f} "
          f"ms), arena {prog.arena_bytes / 1e6:.1f} MB")
    for r in res["by_op"][:args.top]:
        print(f"  {r['op']:<48} {r['calls']:5d} calls {r['ms']:9.1f} ms {100 * r['share']:5.1f} %")
    print("  largest (op, shapes):")
    for r in res["by_op_and_shape"][:args.top]:
        print(f"  {r['ms']:9.1f} ms  {r['op']:<36} {r['shapes']}")
    if args.out:
        doc = {"benchmark": __doc__.splitlines()[0], "command": command_line(argv),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "export_s": export_s,
               "arena_mb": prog.arena_bytes / 1e6, "planned_mb": prog.planned_bytes / 1e6,
               "rewrites": prog.rewrites, **res}
        write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
