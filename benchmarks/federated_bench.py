"""Federated benchmark: Flower federation of adapters on real offline data (CPU, reduced scale).

MobileNetV2 (offline ImageNet weights) -> Fashion-MNIST, clients holding iid or label-skewed
(Dirichlet) shards, Flower's simulation runtime (Ray) and a Flower strategy (FedAvg by default);
for each method, test accuracy after every round and the bytes per client per round counted
from the Flower messages (each message = the method's trainable state as an ArrayRecord).

    python benchmarks/federated_bench.py --out benchmarks/results/federated_cpu.json
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from repnet.federated.run import run_federated
from common import command_line, write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--methods", default="repnet,last")
    ap.add_argument("--partitions", default="iid,dirichlet:0.3")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-subset", type=int, default=2000)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (partition, init, data order); rows per seed")
    ap.add_argument("--strategy", default="fedavg", help="Flower strategy: fedavg, fedprox, fedadam, fedyogi")
    ap.add_argument("--out", default="benchmarks/results/federated_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for method, scheme, seed in [(m, p, int(s)) for m in args.methods.split(",") for p in args.partitions.split(",")
                                 for s in args.seeds.split(",")]:
        ov = dict(seed=seed, dataset=args.dataset, backbone=args.backbone, method=method, image_size=args.image_size,
                  train_subset=args.train_subset, test_subset=args.test_subset, batch_size=args.batch_size,
                  workers=0, progress=False, augment="none", lr=1e-3, lr_side=3e-3, label_smoothing=0.0)
        with tempfile.TemporaryDirectory() as tmp:
            res = run_federated(ov, args.clients, args.rounds, args.local_epochs, scheme, tmp, progress=False,
                                strategy=args.strategy)
        row = {k: res[k] for k in ("framework", "strategy", "method", "partition", "clients", "rounds",
                                   "client_images", "test_accuracy", "adapter_bytes", "message_bytes",
                                   "message_tensor_bytes", "full_model_bytes", "total_bytes", "wall_time_s",
                                   "client_training_memory_mb", "frozen_backbone_tensors_changed")}
        row["accuracy_by_round"] = [h["test_accuracy"] for h in res["history"]]
        row["bytes_received_by_round"] = [h["bytes_received"] for h in res["history"][1:]]
        row["seed"] = seed
        rows.append(row)
        print(f"{method:<8} {scheme:<14} seed {seed} acc by round {' -> '.join(f'{a:.3f}' for a in row['accuracy_by_round'])}"
              f" | message {row['message_bytes'] / 1e6:.2f} MB (model {row['full_model_bytes'] / 1e6:.2f} MB)"
              f" | {row['wall_time_s']:.0f} s", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0],
           "command": command_line(argv),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "note": "lr 1e-3 (head + biases) / 3e-3 (side modules), Adam, no augmentation, CPU, Flower simulation "
                   "(Ray, one actor per core, 1 thread each); message_bytes = serialised ArrayRecord payload "
                   "(tensor data + NumPy headers) per client per round, message_tensor_bytes = its tensor data",
           "rows": rows}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
