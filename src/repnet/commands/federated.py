"""``repnet federated``: FedAvg of the method's trainable state over clients (repnet.federated)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import RepnetError
from ..keyvalue import parse_pairs
from .flags import add_overwrite_flag, check_resume_overwrite

HELP = "FedAvg of the method's trainable state over clients (backbone stays home)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--method", default="repnet")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (default: iid)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="training config key (repeatable), e.g. --set image_size=96 --set train_subset=2000")
    p.add_argument("--out", help="folder for the per-round checkpoint, results.json and the final adapter")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last round")
    add_overwrite_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_resume_overwrite(args)
    from ..federated import run_federated

    ov = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "progress": not args.quiet}
    ov.update(parse_pairs(args.set, "--set"))
    opts = parse_pairs(args.opt, "--opt")
    if opts:
        ov["options"] = opts
    if args.resume and not args.out:
        raise RepnetError("--resume needs --out (the run folder)")
    res = run_federated(ov, args.clients, args.rounds, args.local_epochs, args.partition, args.out,
                        progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    accs = " -> ".join(f"{h['test_accuracy']:.3f}" for h in res["history"])
    print(f"test accuracy by round: {accs}")
    print(f"each message {res['message_bytes'] / 1e6:.2f} MB (the whole model: {res['full_model_bytes'] / 1e6:.2f} MB); "
          f"{res['total_bytes'] / 1e6:.1f} MB exchanged in {res['rounds']} rounds x {res['clients']} clients")
    if args.out:
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'adapter'}")
    return 0
