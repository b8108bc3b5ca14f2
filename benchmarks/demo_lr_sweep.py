"""Learning-rate sweep behind ``repnet.demo.DEMO_LRS``, on the demo's budget, selected on VALIDATION.

For each method, every ``(lr, lr_side)`` of its grid is trained on the demo's exact budget
(MobileNetV2 -> Fashion-MNIST, 112 px, 2,000 train images, 3 epochs, batch 32); the pair with
the best final-epoch accuracy on the validation split (222 images held out of the training
data) is the demo's choice (a tie goes to the lower learning rates, the grid's order). The
test set is never looked at here.

    python benchmarks/demo_lr_sweep.py --out benchmarks/results/demo_lr_sweep.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from repnet.demo.config import DemoConfig
from common import command_line, provenance
from repnet.demo.config import method_config
from repnet.training.run import train

GRIDS = {  # (lr for head + biases, lr_side for side modules)
    "repnet": [(3e-4, 1e-3), (1e-3, 3e-3), (3e-3, 1e-2)],
    "tinytl_lb": [(3e-4, 1e-3), (1e-3, 3e-3), (3e-3, 1e-2)],
    "bias": [(3e-4, 3e-4), (1e-3, 1e-3), (3e-3, 3e-3)],
    "last": [(1e-3, 1e-3), (3e-3, 3e-3), (1e-2, 1e-2)],
    "full": [(1e-4, 1e-4), (3e-4, 3e-4), (1e-3, 1e-3)],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(GRIDS))
    p.add_argument("--runs-dir", default="runs/demo_lr_sweep")
    p.add_argument("--out", default="benchmarks/results/demo_lr_sweep.json")
    args = p.parse_args(argv)
    t0, start = time.time(), provenance()
    runs, best = [], {}
    for method in args.methods.split(","):
        for lr, lr_side in GRIDS[method]:
            cfg = DemoConfig(out_dir=args.runs_dir, progress=False, profile_memory=False,
                             lrs={method: (lr, lr_side)})
            tc = method_config(cfg, method)
            tc.out_dir = str(Path(args.runs_dir) / f"{method}-lr{lr:g}-side{lr_side:g}")
            done = Path(tc.out_dir) / "results.json"
            res = json.loads(done.read_text()) if done.is_file() else train(tc)  # a finished run is reused
            log = [json.loads(line) for line in (Path(tc.out_dir) / "log.jsonl").read_text().splitlines()]
            row = {"method": method, "lr": lr, "lr_side": lr_side, "final_val_accuracy": log[-1]["val_accuracy"],
                   "best_val_accuracy": res["best_val_accuracy"], "wall_time_s": res["wall_time_s"]}
            print(json.dumps(row), flush=True)
            runs.append(row)
        pick = max((r for r in runs if r["method"] == method), key=lambda r: r["final_val_accuracy"])
        best[method] = (pick["lr"], pick["lr_side"])
    result = {
        "what": "per-method learning rates of the demo, chosen on the validation split (final epoch)",
        "command": command_line(argv),
        "budget": {k: v for k, v in DemoConfig().__dict__.items() if k not in ("lrs", "methods", "progress")},
        "runs": runs, "chosen": best, "total_time_s": time.time() - t0,
        "provenance_start": start, "provenance_end": provenance(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"chosen: {best}\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
