"""``repnet export``: a trained model for inference (.pt2 or ONNX), checked against eager
(repnet.export); with ``--training``: an ExecuTorch training program (.pte, repnet.runtime.executorch.program).

The model comes from a run folder (``--run``, its ``adapter/``) or a saved adapter (``--adapter``),
rebuilt by ``repnet.from_pretrained``; a training program may instead be exported from a fresh model
(``--backbone``, ``--method``, ``--num-classes``). docs/export.md and docs/runtime-executorch.md are
the guides.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from repnet.errors import RepnetError

#: The inference formats (repnet.export.inference.FORMATS, without importing torch to build the parser).
FORMATS = ("pt2", "onnx")

HELP = "export a trained model for inference (.pt2 / ONNX), or an ExecuTorch training program (--training)"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"out": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a saved adapter folder (save_pretrained; a run's <run>/adapter)")
    src.add_argument("--run", help="a training run folder (uses <run>/adapter)")
    p.add_argument("--weights", help="the backbone checkpoint the adapter was trained on (default: offline weights)")
    p.add_argument("--format", choices=FORMATS, help="default: from the --out suffix")
    p.add_argument("--out", required=True, help="output file (.pt2 / .onnx; .pte with --training)")
    p.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--no-verify", action="store_true", help="skip the eager-vs-exported check")
    t = p.add_argument_group("training program (--training)")
    t.add_argument("--training", action="store_true", help="an ExecuTorch training program (forward + backward, "
                   "rewritten to keep what the memory engine keeps) instead of an inference export")
    t.add_argument("--backbone", help="a fresh model instead of --run / --adapter: backbone ...")
    t.add_argument("--method", help="... method (default repnet) ...")
    t.add_argument("--num-classes", type=int, help="... and classes (default 10)")
    t.add_argument("--batch-size", type=int, help="the program's batch size (default 8)")
    t.add_argument("--no-rewrite", action="store_true", help="the stock export (for comparison)")
    t.add_argument("--dataset", help="for repnet-device (docs/device.md): a fresh --backbone model for this dataset, "
                   "its recipe in the metadata, and its train / test splits packed beside the program "
                   "(<stem>-train.rpd, <stem>-test.rpd)")
    t.add_argument("--epochs", type=int, help="with --dataset: the epochs the metadata plans (default: the recipe's)")
    t.add_argument("--portable", action="store_true", help="ExecuTorch's portable kernels only (default: repnet's "
                   "own kernels, which the runtime loads from build/device/kernels/librepnet_kernels.so)")


#: Flags of one kind of export only: given with the other, they would be ignored, so they are refused.
TRAINING_ONLY = ("backbone", "method", "num_classes", "batch_size", "no_rewrite", "dataset", "epochs", "portable")
INFERENCE_ONLY = ("format", "no_verify")
FRESH_MODEL = ("method", "num_classes")  # describe the fresh model of --backbone


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, a flag this kind of export would ignore, and a contradiction."""
    from repnet.limits import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, check_int

    def given(names):
        return [n for n in names if getattr(args, n) not in (None, False)]

    def flag(n):
        return "--" + n.replace("_", "-")

    if args.image_size is not None:
        check_int("--image-size", args.image_size, 32, MAX_IMAGE_SIZE)
    if not args.training:
        if given(TRAINING_ONLY):
            raise RepnetError(f"{flag(given(TRAINING_ONLY)[0])} applies to --training (an ExecuTorch training "
                              "program); an inference export takes the model of --run / --adapter as it is")
        suffix = Path(args.out).suffix.lstrip(".")
        if args.format and suffix in FORMATS and suffix != args.format:
            raise RepnetError(f"--format {args.format} contradicts --out {args.out} (a .{suffix} file)")
        if (args.format or suffix) not in FORMATS:
            raise RepnetError(f"--out {args.out}: give a .pt2 or .onnx file name, or --format")
        return
    if given(INFERENCE_ONLY):
        raise RepnetError(f"{flag(given(INFERENCE_ONLY)[0])} applies to inference exports, not to --training")
    if not args.out.endswith(".pte"):
        raise RepnetError(f"--out {args.out}: an ExecuTorch program is a .pte file")
    if (args.adapter or args.run) and (args.backbone or given(FRESH_MODEL)):
        what = "--backbone" if args.backbone else flag(given(FRESH_MODEL)[0])
        raise RepnetError(f"{what} describes a fresh model; the model of --{'run' if args.run else 'adapter'} is "
                          "exported as it was trained (give one of them)")
    if args.batch_size is not None:
        check_int("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    if args.training:
        return _training(args)
    from repnet.api import from_pretrained
    from repnet.export.inference import export_model

    if not (args.adapter or args.run):
        raise RepnetError("give --adapter or --run (the trained model to export)")
    adapter = args.adapter or os.path.join(args.run, "adapter")
    model = from_pretrained(adapter, pretrained=args.weights or True)
    rep = export_model(model, args.out, args.format, args.image_size, verify=not args.no_verify)
    check = "" if rep["max_abs_diff"] is None else f"; max |exported - eager| = {rep['max_abs_diff']:.2g}"
    print(f"wrote {rep['path']} ({rep['format']}, {rep['bytes'] / 1e6:.2f} MB, {rep['params']:,d} parameters, "
          f"{rep['image_size']} px, dynamic batch{check})")
    return 0


def _training(args: argparse.Namespace) -> int:
    from repnet.api import from_pretrained, get_model
    from repnet.runtime.executorch.program import export_training_program, program_build
    from repnet.storage import check_finite

    if args.dataset:  # the device bundle (repnet.runtime.device): program + metadata + packed splits
        return _device_bundle(args)
    batch = args.batch_size or 8
    if args.adapter or args.run:
        model = from_pretrained(args.adapter or os.path.join(args.run, "adapter"), pretrained=args.weights or True,
                                memory="vanilla")
    elif args.backbone:
        method = args.method or "repnet"
        model = get_model(args.backbone, method, 10 if args.num_classes is None else args.num_classes,
                          image_size=args.image_size or 224, pretrained=args.weights or True, **program_build(method))
    else:
        raise RepnetError("give --run / --adapter (a trained model) or --backbone (a fresh one)")
    check_finite(model.state_dict(), f"{args.out}: the model's weights")
    size = args.image_size or int(getattr(model, "image_size", 224))
    prog = export_training_program(model.eval(), batch, size, rewrite=not args.no_rewrite, evaluate=True,
                                   kernels=not args.portable)
    # beside the .pte: what repnet-device needs (the default recipe's optimizer and rates; docs/device.md)
    from repnet.config.recipes import load_recipe
    from repnet.runtime.device.files import program_metadata, write_program

    recipe = load_recipe("default")
    meta = program_metadata(model, prog, lr=recipe["lr"], lr_side=recipe["lr_side"],
                            optimizer={"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
                            total_steps=0, label_smoothing=recipe["label_smoothing"])
    out = os.path.abspath(args.out)
    write_program(os.path.dirname(out), prog, meta, name=os.path.basename(out).removesuffix(".pte"))
    done = ", ".join(f"{k} {v}" for k, v in prog.rewrites.items()) or "none (stock export)"
    print(f"wrote {args.out} ({len(prog.buffer) / 1e6:.2f} MB) and its metadata (.json): planned memory "
          f"{prog.planned_bytes / 1e6:.2f} MB (weights {prog.weights_bytes / 1e6:.2f} MB apart), batch {batch}, "
          f"{size} px, {len(prog.trainable)} trained tensors; rewrites: {done}"
          + ("; it runs repnet's kernels (build/device/kernels/librepnet_kernels.so; --portable for ExecuTorch's own "
             "only)" if prog.kernels else ""))
    return 0


def _device_bundle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repnet.config.recipes import make_config
    from repnet.runtime.device.runner import prepare_run
    from repnet.training.run import run_context

    if args.adapter or args.run:
        raise RepnetError("--dataset exports a fresh model's program for repnet-device: give --backbone, not "
                          "--adapter / --run")
    given = {"method": args.method, "batch_size": args.batch_size, "epochs": args.epochs, "weights": args.weights}
    overrides = {"dataset": args.dataset, "runtime": "device", "backbone": args.backbone or "mobilenet_v2",
                 "image_size": args.image_size or 224, "portable": args.portable,
                 **{k: v for k, v in given.items() if v is not None}}
    cfg = make_config(overrides)
    out = Path(args.out).absolute()
    stem = out.name.removesuffix(".pte")
    facts = prepare_run(cfg, out.parent, run_context(cfg, say=lambda *a: None), name=stem,
                        data_names=(f"{stem}-train.rpd", f"{stem}-test.rpd"))
    print(f"wrote {out} ({facts['program_bytes'] / 1e6:.2f} MB) + {stem}.json (the {args.dataset} recipe: "
          f"{cfg.optimizer}, lr {cfg.lr:g} / lr_side {cfg.lr_side:g}, {facts['total_steps']} steps), "
          f"{stem}-train.rpd ({facts['train_images']} images) and {stem}-test.rpd ({facts['test_images']}); "
          f"arena {facts['program_arena_mb']:.2f} MB. Train it: build/device/repnet-device train --program {out} "
          f"--train {out.parent / (stem + '-train.rpd')} --test {out.parent / (stem + '-test.rpd')} --out RUN")
    return 0
