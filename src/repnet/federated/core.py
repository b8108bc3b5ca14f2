"""Federated learning of adapters on Flower: what the ServerApp and the ClientApp do.

The frozen backbone never travels: a message carries only the method's trainable state as a Flower
``ArrayRecord`` (NumPy arrays, no pickle), and the aggregation is a Flower strategy (FedAvg, FedProx,
FedAdam, FedYogi). What is ours: :class:`Settings` (one run's settings as Flower run config),
:class:`LocalClient` (a client's shard and its local round through the one loop, a pure function of
global state, seed, round and client, so ``--resume`` is bit-identical), :class:`Server` (the rounds
over a Flower ``Grid``, every reply screened before the strategy sees it, an atomic checkpoint per
round) and INT8 weights travelling as int8 codes. docs/federated.md, "How a round works".
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from repnet.training import loop
from repnet.errors import NonFinite, RepnetError
from repnet.limits import check_number
from repnet.storage import (RunKind, Spec, atomic_write_text, check_fields, check_resumable, claim_folder,
                            clean_temps, load_checkpoint, missing_root, non_finite, release_claim, save_checkpoint,
                            set_run_state)
from repnet.config.schema import SESSION_KEYS

__all__ = ["Settings", "STRATEGIES", "partition", "state_bytes", "LocalClient", "Server", "screen_reply",
           "encode_state", "decode_arrays", "RUN"]

#: strategy name -> (Flower class name in flwr.serverapp.strategy, its options and defaults)
STRATEGIES: dict[str, tuple[str, dict[str, float]]] = {
    "fedavg": ("FedAvg", {}),
    "fedprox": ("FedProx", {"proximal_mu": 0.01}),
    "fedadam": ("FedAdam", {"eta": 1e-2, "eta_l": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    "fedyogi": ("FedYogi", {"eta": 1e-2, "eta_l": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
}
#: The range of every strategy option (low, high, low excluded, high excluded): checked in :class:`Settings`.
OPTION_RANGES: dict[str, tuple] = {"proximal_mu": (0.0, None, False, False), "eta": (0.0, None, True, False),
                                   "eta_l": (0.0, None, True, False), "beta_1": (0.0, 1.0, False, True),
                                   "beta_2": (0.0, 1.0, False, True), "tau": (0.0, None, True, False)}
_WHAT = ("dataset", "backbone", "method")  # run-config keys of their own; other config keys go in "set"


def partition(targets, clients: int, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Disjoint index sets, one per client, covering ``range(len(targets))``: ``iid`` (a seeded
    shuffle cut into equal parts) or ``dirichlet:ALPHA`` (per class, the images are divided in
    proportions drawn from Dirichlet(ALPHA); small ALPHA = each client sees few classes)."""
    targets = np.asarray(targets)
    n = len(targets)
    if clients < 1:
        raise RepnetError(f"clients must be >= 1, got {clients}")
    if clients > n:
        raise RepnetError(f"{clients} clients for {n} training images: fewer clients or more data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    alpha = _dirichlet_alpha(scheme)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].extend(piece.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_alpha(scheme: str) -> float:
    if not scheme.startswith("dirichlet:"):
        raise RepnetError(f"unknown partition '{scheme}'; use iid or dirichlet:ALPHA")
    try:
        alpha = float(scheme.split(":", 1)[1])
    except ValueError:
        alpha = -1.0
    if not alpha > 0:
        raise RepnetError(f"partition '{scheme}': ALPHA in dirichlet:ALPHA must be a number > 0")
    return alpha


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _text(v: Any) -> str:
    """A config value as ``key=value`` text that :mod:`repnet.keyvalue` reads back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    s = repr(v) if isinstance(v, float) else str(v)
    if not s or any(c.isspace() for c in s) or isinstance(v, (dict, list)):
        raise RepnetError(f"federated settings: value {v!r} cannot travel in the run config")
    return s


@dataclasses.dataclass(frozen=True)
class Settings:
    """One federated run. ``overrides`` are training config keys (:func:`repnet.config.make_config`)."""

    overrides: dict
    clients: int = 4
    rounds: int = 5
    local_epochs: int = 1
    partition: str = "iid"
    strategy: str = "fedavg"
    strategy_options: dict = dataclasses.field(default_factory=dict)
    min_clients: int = 0  # usable replies a round needs (0: all clients)
    timeout: float = 3600.0  # seconds a round waits for replies
    out: str = ""
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.rounds < 1 or self.local_epochs < 1:
            raise RepnetError("rounds and local_epochs must be >= 1")
        if self.clients < 1:
            raise RepnetError(f"clients must be >= 1, got {self.clients}")
        if self.partition != "iid":
            _dirichlet_alpha(self.partition)
        if self.strategy not in STRATEGIES:
            raise RepnetError(f"unknown strategy '{self.strategy}'; choose from: {', '.join(STRATEGIES)}")
        known = STRATEGIES[self.strategy][1]
        bad = sorted(set(self.strategy_options) - set(known))
        if bad:
            raise RepnetError(f"strategy {self.strategy} has no option {', '.join(bad)}"
                              f"{'; it takes: ' + ', '.join(known) if known else ' (it takes none)'}")
        if not 0 <= self.min_clients <= self.clients:
            raise RepnetError(f"min_clients must be between 1 and clients ({self.clients}), got {self.min_clients}")
        self.strategy_kwargs()  # every option a finite number in its range
        check_number("round timeout", self.timeout, 0.0, None, low_open=True)

    @property
    def needed(self) -> int:
        return self.min_clients or self.clients

    def strategy_kwargs(self) -> dict[str, float]:
        opts = dict(STRATEGIES[self.strategy][1])
        for k, v in self.strategy_options.items():
            try:
                opts[k] = float(v)
            except (TypeError, ValueError):
                raise RepnetError(f"strategy option {k}={v!r}: expected a number") from None
            low, high, low_open, high_open = OPTION_RANGES[k]
            check_number(f"strategy option {k}", opts[k], low, high, low_open, high_open)
        return opts

    def identity(self) -> dict:
        """What must not change between a run and its ``--resume`` (``rounds`` may grow)."""
        from repnet.config.recipes import make_config

        from repnet.methods import METHODS, parse_options

        cfg = make_config(self.overrides)
        config = {k: v for k, v in cfg.to_dict().items() if k not in SESSION_KEYS}
        if cfg.options and cfg.method in METHODS:  # "2" from a run config and 2 from Python are the same option
            opts = parse_options(METHODS.get(cfg.method).Options, cfg.options, cfg.method)
            config["options"] = {k: getattr(opts, k) for k in cfg.options}
        return {"config": config,
                "clients": self.clients, "local_epochs": self.local_epochs, "partition": self.partition,
                "strategy": self.strategy, "strategy_options": self.strategy_kwargs()}

    # Flower's run config: flat str / int / float / bool values
    def run_config(self) -> dict[str, Any]:
        ov = dict(self.overrides)
        rc: dict[str, Any] = {k: str(ov.pop(k)) for k in _WHAT if k in ov}
        opts = ov.pop("options", None) or {}
        rc["set"] = " ".join(f"{k}={_text(v)}" for k, v in ov.items())
        rc["opt"] = " ".join(f"{k}={_text(v)}" for k, v in opts.items())
        rc.update({"clients": self.clients, "num-server-rounds": self.rounds, "local-epochs": self.local_epochs,
                   "partition": self.partition, "strategy": self.strategy,
                   "strategy-options": " ".join(f"{k}={_text(v)}" for k, v in self.strategy_options.items()),
                   "min-clients": self.min_clients, "round-timeout": float(self.timeout), "out": self.out,
                   "resume": bool(self.resume), "overwrite": bool(self.overwrite)})
        return rc

    @classmethod
    def from_run_config(cls, rc: dict) -> "Settings":
        from repnet.keyvalue import parse_pairs

        def pairs(key):
            return parse_pairs(str(rc.get(key, "") or "").split(), f"run config '{key}'")

        ov: dict[str, Any] = {k: rc[k] for k in _WHAT if rc.get(k)}
        ov.update(pairs("set"))
        opts = pairs("opt")
        if opts:
            ov["options"] = opts
        try:
            return cls(ov, clients=int(rc.get("clients", 4)), rounds=int(rc.get("num-server-rounds", 5)),
                       local_epochs=int(rc.get("local-epochs", 1)), partition=str(rc.get("partition", "iid")),
                       strategy=str(rc.get("strategy", "fedavg")), strategy_options=pairs("strategy-options"),
                       min_clients=int(rc.get("min-clients", 0)), timeout=float(rc.get("round-timeout", 3600)),
                       out=str(rc.get("out", "") or ""), resume=bool(rc.get("resume", False)),
                       overwrite=bool(rc.get("overwrite", False)))
        except (TypeError, ValueError) as e:
            raise RepnetError(f"federated run config: {e}") from None


# ----------------------------------------------------------------------------- messages
def encode_state(model: nn.Module, state: dict[str, torch.Tensor]):
    """The trainable state as a Flower ArrayRecord (int8 codes + scales in int8-master mode)."""
    from flwr.app import ArrayRecord

    from repnet.memory.int8 import pack_on_grid

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in pack_on_grid(model, state).items()})


def decode_arrays(arrays) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float state (int8 codes decoded); raises on bytes that do not decode."""
    from repnet.memory.int8 import unpack_on_grid

    return unpack_on_grid({k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()})


def _payload(arrays) -> tuple[int, int]:
    """(serialised bytes of the arrays, bytes of their tensor data) in an ArrayRecord."""
    wire = sum(len(a.data) for a in arrays.values())
    data = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in arrays.values())
    return wire, data


def screen_reply(msg, expected: dict[str, torch.Tensor]) -> tuple[dict | None, str]:
    """``(content, "")`` for a usable training reply, ``(None, reason)`` otherwise.

    ``content``: ``{"state", "num_examples", "partition_id", "loss", "wire_bytes", "data_bytes"}``.
    Usable = no error, one ArrayRecord that decodes to exactly ``expected``'s keys, shapes and
    dtypes with only finite numbers, and a MetricRecord with a positive ``num-examples``.
    """
    if msg.has_error():
        return None, f"error reply: {msg.error.reason}"
    rd = msg.content
    if len(rd.array_records) != 1 or len(rd.metric_records) != 1:
        return None, "expected one ArrayRecord and one MetricRecord"
    arrays = next(iter(rd.array_records.values()))
    metrics = next(iter(rd.metric_records.values()))
    try:
        state = decode_arrays(arrays)
        wire, data = _payload(arrays)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt message
        return None, f"arrays do not decode ({type(e).__name__})"
    if set(state) != set(expected):
        diff = sorted(set(state) ^ set(expected))
        return None, f"keys differ from the adapter's ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"
    for k, v in state.items():
        e = expected[k]
        if v.shape != e.shape or v.dtype != e.dtype:
            return None, f"{k}: {tuple(v.shape)} {v.dtype} instead of {tuple(e.shape)} {e.dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return None, f"{k}: non-finite values"
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(n):
        return None, "no positive num-examples"
    return {"state": state, "num_examples": int(n), "partition_id": int(metrics.get("partition-id", -1)),
            "loss": float(metrics.get("train-loss", float("nan"))), "wire_bytes": wire, "data_bytes": data}, ""


def aggregate(strategy, server_round: int, accepted: list[dict]) -> dict[str, torch.Tensor]:
    """The strategy's aggregate of screened replies (:func:`screen_reply` contents), in client order
    (deterministic sums): only their tensors and example counts reach the strategy."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    accepted = sorted(accepted, key=lambda c: c["partition_id"])
    clean = [Message(RecordDict({"arrays": ArrayRecord({k: v.contiguous() for k, v in c["state"].items()}),
                                 "metrics": MetricRecord({"num-examples": c["num_examples"]})}),
                     dst_node_id=0, message_type="train") for c in accepted]
    agg, _ = strategy.aggregate_train(server_round, clean)
    return decode_arrays(agg)


# ----------------------------------------------------------------------------- client
class LocalClient:
    """One client's shard and model; ``train`` is one local round (docs/federated.md)."""

    def __init__(self, settings: Settings, partition_id: int, num_partitions: int):
        from repnet.config.build import build_data, build_model
        from repnet.config.recipes import make_config

        if not 0 <= partition_id < num_partitions:
            raise RepnetError(f"partition-id {partition_id} is not in 0..{num_partitions - 1}")
        self.cfg = make_config(settings.overrides)
        self.device = loop.resolve_device(self.cfg.device)
        train_ds, _val, _test, num_classes, _ = build_data(self.cfg)
        shard = partition(train_ds.targets, num_partitions, settings.partition, self.cfg.seed)[partition_id]
        if len(shard) < self.cfg.batch_size:
            raise RepnetError(f"client {partition_id} got {len(shard)} images, less than one batch of "
                              f"{self.cfg.batch_size}: fewer clients, a milder partition, or a smaller batch")
        self.shard = Subset(train_ds, shard.tolist())
        self.partition_id = partition_id
        loop.seed_everything(self.cfg.seed)
        self.model = build_model(self.cfg, num_classes).to(self.device)
        self.pristine = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.local_cfg = dataclasses.replace(self.cfg, epochs=settings.local_epochs, max_steps=None,
                                             checkpoint_every=0, progress=False)

    def train(self, arrays, server_round: int, proximal_mu: float = 0.0):
        """Load the global adapter, train ``local_epochs`` on the shard; returns the reply's
        (ArrayRecord, metrics dict)."""
        model = self.model
        model.load_state_dict(self.pristine)
        model.load_state_dict({k: v.to(self.device) for k, v in decode_arrays(arrays).items()}, strict=False)
        seed = loop.mix_seed(self.cfg.seed, server_round, self.partition_id)
        loop.seed_everything(seed)
        objective = None
        if proximal_mu > 0:  # FedProx: + mu/2 ||w - w_global||^2 over what trains
            crit = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
            anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

            def objective(x, y):
                logits = model(x)
                prox = sum((p - g).pow(2).sum() for p, g in anchor)
                return crit(logits, y) + 0.5 * proximal_mu * prox, logits

        losses: list[float] = []
        loop.fit(model, self.shard, self.local_cfg, self.device, loop.make_optimizer(model, self.local_cfg),
                 seed=seed, objective=objective, on_epoch=lambda st, rec: losses.append(rec["train_loss"]),
                 name=f"client {self.partition_id}", stop_hint="; lower --lr / --lr-side")
        state = {k: v.detach() for k, v in model.trainable_state_dict().items()}
        return encode_state(model, state), {"num-examples": len(self.shard), "partition-id": self.partition_id,
                                            "train-loss": float(np.mean(losses)) if losses else float("nan")}


# ----------------------------------------------------------------------------- server
#: A federated run folder (``overwrite=True`` replaces exactly these files, once the checkpoint is ours).
#: What a federated run's checkpoint holds (checked after its checksum: :func:`repnet.storage.check_fields`).
CHECKPOINT_FIELDS = {"round": Spec(int, low=1), "global_state": Spec(dict, values=torch.Tensor),
                     "history": Spec(list, items=Spec(dict, fields={"round": int, "test_accuracy": float})),
                     "strategy_state": Spec(dict, values=Spec(dict, values=torch.Tensor)),
                     "settings": Spec(dict, fields={"config": dict})}


#: What the history records of each round (after round 0): what the results are made from.
ROUND_FIELDS = {"clients": Spec(list, items=int), "failures": list,
                "bytes_sent_per_client": Spec(int, low=0), "tensor_bytes_sent_per_client": Spec(int, low=0),
                "bytes_received": Spec(dict, values=Spec(int, low=0)),
                "tensor_bytes_received": Spec(dict, values=Spec(int, low=0))}


def _verify_run(folder: Path) -> None:
    """Raise unless ``folder/checkpoint.pt`` is a federated run's checkpoint (checksum and keys)."""
    try:
        load_checkpoint(folder / "checkpoint.pt", fields=CHECKPOINT_FIELDS)
    except RepnetError as e:
        raise RepnetError(f"--overwrite: {folder} does not hold a federated run ({e}); give a new or empty "
                          "folder") from None


RUN = RunKind("federated run", "checkpoint.pt", ("checkpoint.pt", "adapter", "results.json"), _verify_run,
              "repnet federated")


def _project_on_grid(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8-master mode: the INT8-trained weights of an average, rounded back onto their int8 grid."""
    from repnet.memory.int8 import int8_layers, quantize

    cfg = getattr(model, "int8_config", None)
    if not cfg or cfg.get("master") != "int8":
        return state
    out = dict(state)
    layers = set(int8_layers(model))
    for name, m in model.named_modules():
        key = f"{name}.weight"
        if m in layers and key in state:
            codes, scale = quantize(state[key], "nearest")
            out[key] = codes * scale
    return out


class Server:
    """The ServerApp's work: rounds of a Flower strategy over a Grid, screened replies, per-round
    evaluation, bytes, checkpoint and results (docs/federated.md)."""

    def __init__(self, settings: Settings, progress: bool = False, on_round=None):
        from repnet.config.recipes import make_config

        self.s = settings
        self.cfg = make_config(settings.overrides)
        self.identity = settings.identity()
        self.out = Path(settings.out) if settings.out else None
        self.ckpt_path = self.out / "checkpoint.pt" if self.out else None
        self.on_round = on_round
        self.progress = progress
        self.ckpt = None
        if settings.resume:
            if self.ckpt_path is None:
                raise RepnetError("cannot resume: no run folder (--out)")
            check_resumable(self.out, RUN)
            clean_temps(self.ckpt_path.parent)
            self.ckpt = load_checkpoint(self.ckpt_path, fields=CHECKPOINT_FIELDS)
            if self.ckpt.get("settings") != self.identity:
                changed = sorted(k for k in self.identity if self.identity[k] != self.ckpt.get("settings", {}).get(k))
                raise RepnetError(f"cannot resume {settings.out}: its settings differ ({', '.join(changed)}); only "
                                  "--rounds may change")
        elif self.out is not None:
            created = missing_root(self.out)
            claim_folder(self.out, kind=RUN, overwrite=settings.overwrite)
            try:
                self._build()
            except RepnetError:  # bad input found while building: no run folder is left behind
                release_claim(self.out, RUN, created)
                raise
            return
        self._build()

    def _build(self) -> None:
        """The data, partition, model and test loader of the run (and the resumed checkpoint's checks)."""
        from repnet.config.build import build_data, build_model

        settings = self.s
        self.device = loop.resolve_device(self.cfg.device)
        train_ds, _val, test_ds, self.num_classes, _ = build_data(self.cfg)
        self.client_images = [len(p) for p in partition(train_ds.targets, settings.clients, settings.partition,
                                                         self.cfg.seed)]
        if min(self.client_images) < self.cfg.batch_size:
            raise RepnetError(f"a client got {min(self.client_images)} images, less than one batch of "
                              f"{self.cfg.batch_size}: fewer clients, a milder partition, or a smaller batch")
        loop.seed_everything(self.cfg.seed)
        self.model = build_model(self.cfg, self.num_classes).to(self.device)
        self.backbone_before = {k: v.clone() for k, v in self.model.backbone.state_dict().items()}
        self.expected = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        self.test_loader = loop.make_loader(test_ds, self.cfg, self.device)
        if self.ckpt is not None:
            self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        """The resumed checkpoint fits this run: its global state is this adapter's, every round is recorded."""
        where = f"cannot resume {self.s.out}: its checkpoint"
        got = self.ckpt["global_state"]
        if set(got) != set(self.expected) or any(got[k].shape != v.shape for k, v in self.expected.items()):
            raise RepnetError(f"{where}'s global state is not this model's adapter (keys or shapes differ)")
        rounds = [h["round"] for h in self.ckpt["history"]]
        if rounds != list(range(self.ckpt["round"] + 1)):
            raise RepnetError(f"{where} records rounds {rounds[:5]}, not 0..{self.ckpt['round']}")
        for h in self.ckpt["history"][1:]:
            check_fields(h, ROUND_FIELDS, f"{where}'s round {h['round']}")

    def _strategy(self):
        import flwr.serverapp.strategy as fs

        cls = getattr(fs, STRATEGIES[self.s.strategy][0])
        n = self.s.needed  # sample every connected client, wait for at least n of them
        return cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                   min_evaluate_nodes=0, **self.s.strategy_kwargs())

    def _evaluate(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        return loop.evaluate(self.model, self.test_loader, self.device)["accuracy"]

    def _client_memory(self) -> dict:
        """Training memory of one client (the same model and batch on every client), from the profiler."""
        from repnet.memory import profile

        p = profile(self.model, batch_size=self.cfg.batch_size, image_size=self.cfg.image_size, peak=False)
        self.model.load_state_dict({k: v.to(self.device) for k, v in self.expected.items()}, strict=False)
        return {k: p[k] for k in ("analytic_mb", "analytic_with_optimizer_mb", "measured_saved_mb")}

    def run(self, grid) -> dict:
        from flwr.app import ConfigRecord

        from tqdm.auto import tqdm

        s = self.s
        strategy = self._strategy()
        global_state = {k: v.clone() for k, v in self.expected.items()}
        first, history = 1, None
        if self.ckpt is not None:
            global_state = {k: v.cpu() for k, v in self.ckpt["global_state"].items()}
            history = self.ckpt["history"]
            first = self.ckpt["round"] + 1
            for attr, st in self.ckpt.get("strategy_state", {}).items():
                setattr(strategy, attr, {k: v.numpy() for k, v in st.items()})
        else:
            history = [{"round": 0, "test_accuracy": self._evaluate(global_state)}]
        memory = self._client_memory()
        t0 = time.time()
        bar = tqdm(range(first, s.rounds + 1), desc="rounds", disable=not self.progress)
        for r in bar:
            arrays = encode_state(self.model, global_state)
            sent_wire, sent_data = _payload(arrays)
            msgs = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages=msgs, timeout=s.timeout))
            by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs if m.metadata.message_id}

            def node_of(reply):  # an error reply made by the SuperLink names the SuperLink as its source
                return by_id.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))

            accepted, rejected = [], []
            for m in replies:
                c, why = screen_reply(m, self.expected)
                if c is None:
                    rejected.append({"node": node_of(m), "reason": why})
                else:
                    accepted.append(c)
            answered = {node_of(m) for m in replies}
            rejected += [{"node": int(m.metadata.dst_node_id), "reason": "no reply within the round timeout"}
                         for m in msgs if int(m.metadata.dst_node_id) not in answered]
            if len(accepted) < s.needed:
                why = "; ".join(f"node {x['node']}: {x['reason']}" for x in rejected[:3]) or "no replies"
                raise RepnetError(f"round {r}: {len(accepted)} usable client replies, {s.needed} "
                                  f"needed ({why}); the global adapter of round {r - 1} is kept")
            accepted.sort(key=lambda c: c["partition_id"])
            new = aggregate(strategy, r, accepted)
            global_state = _project_on_grid(self.model, {k: new[k].to(self.expected[k].dtype) for k in self.expected})
            bad = non_finite(global_state)
            if bad is not None:  # (e.g. a strategy's own arithmetic); nothing of this round is written
                raise NonFinite(f"round {r}: the {s.strategy} aggregate is non-finite ({bad}); the global adapter of "
                                f"round {r - 1} is kept")
            acc = self._evaluate(global_state)
            sizes = [c["num_examples"] for c in accepted]
            history.append({
                "round": r, "test_accuracy": acc,
                "client_train_loss": float(np.average([c["loss"] for c in accepted], weights=sizes)),
                "clients": [c["partition_id"] for c in accepted], "failures": rejected,
                "bytes_sent_per_client": sent_wire, "tensor_bytes_sent_per_client": sent_data,
                "bytes_received": {str(c["partition_id"]): c["wire_bytes"] for c in accepted},
                "tensor_bytes_received": {str(c["partition_id"]): c["data_bytes"] for c in accepted},
            })
            bar.set_postfix(acc=f"{acc:.3f}", clients=len(accepted))
            if self.ckpt_path is not None:
                sstate = {a: {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, a).items()}
                          for a in ("m_t", "v_t") if getattr(strategy, a, None)}
                save_checkpoint({"round": r, "global_state": global_state, "history": history,
                                 "strategy_state": sstate, "settings": self.identity}, self.ckpt_path)
            if self.on_round is not None:
                self.on_round(r)
        return self._results(global_state, history, memory, time.time() - t0)

    def _results(self, global_state, history, memory, wall) -> dict:
        s, cfg, model = self.s, self.cfg, self.model
        model.load_state_dict({k: v.to(self.device) for k, v in global_state.items()}, strict=False)
        exchanged = {k[len("backbone."):] for k in global_state if k.startswith("backbone.")}  # e.g. biases
        changed = [k for k, v in model.backbone.state_dict().items()
                   if k not in exchanged and not torch.equal(v, self.backbone_before[k])]
        last = history[-1]
        results = {
            "framework": "flower", "strategy": s.strategy, "strategy_options": s.strategy_kwargs(),
            "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "options": cfg.options,
            "clients": s.clients, "rounds": s.rounds, "local_epochs": s.local_epochs, "partition": s.partition,
            "client_images": self.client_images, "num_classes": self.num_classes,
            "test_accuracy": last["test_accuracy"], "history": history,
            "adapter_bytes": state_bytes(self.expected),
            "message_bytes": last.get("bytes_sent_per_client"),
            "message_tensor_bytes": last.get("tensor_bytes_sent_per_client"),
            "full_model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "total_bytes": sum(h["bytes_sent_per_client"] * (len(h["clients"]) + len(h["failures"]))
                               + sum(h["bytes_received"].values()) for h in history[1:]),
            "client_training_memory_mb": memory,
            "frozen_backbone_tensors_changed": changed,  # must stay empty
            "backbone_tensors_exchanged": len(exchanged),
            "wall_time_s": wall, "config": cfg.to_dict(),
        }
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(self.out / "adapter"))
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
            set_run_state(self.out, RUN, "finished")
            results["out_dir"] = str(self.out)
        return results
