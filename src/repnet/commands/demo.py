"""``repnet demo``: the offline demo (MobileNetV2 -> Fashion-MNIST, Rep-Net vs its baselines; repnet.demo).

Its flags change the shared budget (resolution, subsets, epochs, batch) and the compared methods
(``--method a,b``, ``--opt`` for every method that has the option); everything else is
:class:`repnet.demo.config.DemoConfig`'s. The output folder is claimed as a demo's (an earlier demo is
replaced, anything else refused). docs/demo.md is the guide.
"""
from __future__ import annotations

import argparse

from repnet.demo.config import LINEAR_PROBE, DemoConfig
from repnet.errors import RepnetError
from repnet.keyvalue import parse_pairs

HELP = "offline demo: MobileNetV2 -> Fashion-MNIST, repnet vs baselines"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"out": "run"}


def configure(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--out", default=d.out_dir, help=f"output folder (default: {d.out_dir})")
    p.add_argument("--method", default=",".join(d.methods),
                   help=f"comma-separated methods; '{LINEAR_PROBE}' = logistic regression on frozen features "
                        f"(default: {','.join(d.methods)})")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option (repeatable), for every compared method that has it; see `repnet list -v`")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--train-subset", type=int, default=d.train_subset, help="training images")
    p.add_argument("--test-subset", type=int, default=d.test_subset, help="test images")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--memory", choices=["engine", "vanilla"], default=d.memory)
    p.add_argument("--workers", type=int, default=d.workers, help="data-loader workers (default: 0)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--no-profile", action="store_true", help="skip the memory measurements")
    p.add_argument("--tune", action="store_true", help="every compared method chooses its learning rate on the "
                   "validation split first (repnet train --tune), instead of the demo's committed rates")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from repnet.demo.run import run as run_demo

    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    if not methods:
        raise RepnetError("--method is empty")
    cfg = DemoConfig(out_dir=args.out, methods=methods, image_size=args.image_size, train_subset=args.train_subset,
                     test_subset=args.test_subset, epochs=args.epochs, batch_size=args.batch_size,
                     memory=args.memory, workers=args.workers, seed=args.seed, device=args.device,
                     data_root=args.data_root, profile_memory=not args.no_profile, progress=not args.quiet,
                     options=parse_pairs(args.opt, "--opt"), tune=args.tune)
    run_demo(cfg)
    return 0
