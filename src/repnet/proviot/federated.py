"""Federated ProvIoT on Flower: every device trains the autoencoder on its own benign paths, the
server averages with a Flower strategy; only the autoencoder's tensors travel.

A *fleet folder* holds one sub-folder per device, ``device-K/``, with that device's benign trace
files (``*.json``, :mod:`.collect`). Device ``K`` (Flower's ``partition-id``) reads only its own
folder: it learns its own frequency database from its own benign history, summarises its windows
into its K rarest paths, embeds them with the hash embedding (:class:`.embed.HashEmbedder`: the
same function on every device, nothing to ship), and trains the global autoencoder for
``local_epochs`` through :func:`repnet.training.loop.fit` from the weights the server sent. Its reply is
one ``ArrayRecord`` (the autoencoder's ``state_dict``, as in :mod:`repnet.federated.core`) and one
``MetricRecord`` (``num-examples``, ``train-loss``); traces, paths and vectors never leave it.

The server (:class:`FleetServer`, the ServerApp's work) screens each reply with
:func:`repnet.federated.core.screen_reply` (keys, shapes, dtypes, finite values), aggregates with the
strategy (``FedAvg`` by default, weighted by the number of paths), and counts the bytes of every
message it sends and receives (the serialised arrays of the ArrayRecords). After the last round
each device adapts the global model to itself (``personal_epochs`` of local training: the global
model is the start, the device's own benign behaviour the finish - FedAvg with local adaptation)
and calibrates its thresholds on its own held-out benign windows (:func:`device_detector`).

``simulate`` runs the apps in Flower's simulation runtime; ``write_fleet_app`` writes a Flower app
folder for ``flwr run`` against a SuperLink and SuperNodes (``--node-config "partition-id=K
num-partitions=N"``), the deployment :mod:`repnet.federated.app` uses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path as FsPath

import numpy as np

from repnet.errors import RepnetError
from repnet.federated.core import STRATEGIES, aggregate, decode_arrays, screen_reply
from repnet.proviot.collect import load_trace
from repnet.proviot.detector import Detector, DetectorSettings, autoencoder, calibrate, fit_autoencoder, split_benign
from repnet.proviot.embed import HashEmbedder
from repnet.proviot.graph import ProvGraph, window_graphs
from repnet.proviot.paths import FrequencyDB, rarest_paths

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def device_folder(fleet, k: int) -> FsPath:
    return FsPath(fleet) / f"device-{k}"


def benign_windows(folder) -> list[ProvGraph]:
    """The benign windows of every trace file in ``folder`` (sorted by name)."""
    folder = FsPath(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise RepnetError(f"{folder}: no trace files (*.json) - the device's benign set is empty")
    graphs = [g for f in files for g in window_graphs(load_trace(f)) if g.label == "benign" and g.edges]
    if not graphs:
        raise RepnetError(f"{folder}: the traces hold no benign window - the device's benign set is empty")
    return graphs


class DeviceData:
    """One device's local state: its frequency DB, its train / held-out windows and train vectors."""

    def __init__(self, graphs: list[ProvGraph], s: DetectorSettings):
        if s.embedding != "hash":
            raise RepnetError("federated ProvIoT uses the hash embedding (the same function on every device); "
                              f"got embedding={s.embedding}")
        self.s = s
        self.train_g, self.val_g = split_benign(graphs, s.val_fraction, s.seed)
        if not self.val_g:
            raise RepnetError("a device needs at least two benign windows (one held out for its thresholds)")
        self.db = FrequencyDB.build(self.train_g)
        self.embedder = HashEmbedder(s.dim)
        paths = [p for g in self.train_g for p in rarest_paths(g, self.db, s.k, s.max_len)]
        self.x = self.embedder.transform([p.words() for p in paths])


def device_detector(data: DeviceData, state: dict, personal_epochs: int = 0, seed: int = 0) -> Detector:
    """The device's detector: the global autoencoder, adapted to the device by ``personal_epochs``
    of local training on its own benign paths (``loop.fit``; nothing leaves the device), thresholds
    from its own held-out benign windows."""
    import torch

    ae = autoencoder(data.s.dim)
    ae.load_state_dict(state)
    if personal_epochs:
        torch.manual_seed(seed)
        fit_autoencoder(ae, data.x, data.s, seed=seed, name="personalise", epochs=personal_epochs)
    ae.eval()
    det = Detector(data.db, data.embedder, ae, data.s)
    calibrate(det, data.val_g)
    return det


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    fleet: str  # the fleet folder (device-K/ sub-folders)
    clients: int = 3
    rounds: int = 5
    local_epochs: int = 10
    personal_epochs: int = 10  # after the rounds: local adaptation of the global model on each device
    strategy: str = "fedavg"
    settings: DetectorSettings = dataclasses.field(default_factory=DetectorSettings)
    out: str = ""
    timeout: float = 600.0

    def __post_init__(self):
        if self.clients < 1 or self.rounds < 1 or self.local_epochs < 1 or self.personal_epochs < 0:
            raise RepnetError("clients, rounds and local_epochs must be >= 1 (personal_epochs >= 0)")
        if self.strategy not in STRATEGIES:
            raise RepnetError(f"unknown strategy '{self.strategy}'; choose from: {', '.join(STRATEGIES)}")

    def run_config(self) -> dict:
        return {"proviot-fleet": str(self.fleet), "clients": self.clients, "num-server-rounds": self.rounds,
                "local-epochs": self.local_epochs, "personal-epochs": self.personal_epochs, "strategy": self.strategy,
                "detector": json.dumps(dataclasses.asdict(self.settings)), "out": self.out,
                "round-timeout": float(self.timeout)}

    @classmethod
    def from_run_config(cls, rc: dict) -> "FleetSettings":
        try:
            s = DetectorSettings(**json.loads(str(rc.get("detector", "{}"))))
            return cls(fleet=str(rc["proviot-fleet"]), clients=int(rc.get("clients", 3)),
                       rounds=int(rc.get("num-server-rounds", 5)), local_epochs=int(rc.get("local-epochs", 10)),
                       personal_epochs=int(rc.get("personal-epochs", 10)),
                       strategy=str(rc.get("strategy", "fedavg")), settings=s, out=str(rc.get("out", "") or ""),
                       timeout=float(rc.get("round-timeout", 600)))
        except (KeyError, TypeError, ValueError) as e:
            raise RepnetError(f"proviot federated run config: {e}") from None


def wire_bytes(arrays) -> int:
    """Bytes of an ArrayRecord's serialised arrays (what the message carries of the model)."""
    return sum(len(a.data) for a in arrays.values())


_DEVICES: dict[tuple, DeviceData] = {}
_LOCK = threading.Lock()


def _device(fs: FleetSettings, pid: int) -> DeviceData:
    key = (fs.fleet, pid, json.dumps(dataclasses.asdict(fs.settings)))
    with _LOCK:
        if key not in _DEVICES:
            threads = int(os.environ.get("REPNET_CLIENT_THREADS", "0"))
            if threads:
                import torch

                torch.set_num_threads(threads)
            _DEVICES[key] = DeviceData(benign_windows(device_folder(fs.fleet, pid)), fs.settings)
    return _DEVICES[key]


def client_train(fs: FleetSettings, pid: int, arrays, server_round: int):
    """One device's local round: the global weights in, ``local_epochs`` of ``loop.fit``, the weights out."""
    from flwr.app import ArrayRecord

    data = _device(fs, pid)
    import torch

    ae = autoencoder(fs.settings.dim)
    ae.load_state_dict({k: v for k, v in decode_arrays(arrays).items()})
    seed = (fs.settings.seed * 1000 + server_round) * 100 + pid
    torch.manual_seed(seed)
    fit = fit_autoencoder(ae, data.x, fs.settings, seed=seed, name=f"device {pid}", epochs=fs.local_epochs)
    state = {k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}
    return ArrayRecord(state), {"num-examples": int(len(data.x)), "partition-id": pid,
                                "train-loss": float(fit["losses"][-1]) if fit["losses"] else float("nan"),
                                "train-time-s": float(fit["train_time_s"])}


class FleetServer:
    """The ServerApp's rounds: Flower strategy, screened replies, bytes per device per round."""

    def __init__(self, fs: FleetSettings):
        import torch

        self.fs = fs
        torch.manual_seed(fs.settings.seed)
        self.initial = {k: v.detach().clone() for k, v in autoencoder(fs.settings.dim).state_dict().items()}

    def run(self, grid) -> dict:
        import flwr.serverapp.strategy as fstrat
        from flwr.app import ArrayRecord, ConfigRecord

        fs = self.fs
        cls = getattr(fstrat, STRATEGIES[fs.strategy][0])
        strategy = cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=fs.clients,
                       min_available_nodes=fs.clients, min_evaluate_nodes=0, **STRATEGIES[fs.strategy][1])
        state = {k: v.clone() for k, v in self.initial.items()}
        history = []
        t0 = time.time()
        for r in range(1, fs.rounds + 1):
            arrays = ArrayRecord({k: v.contiguous() for k, v in state.items()})
            sent = wire_bytes(arrays)
            msgs = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages=msgs, timeout=fs.timeout))
            accepted, rejected, records = [], [], {}
            for m in replies:
                c, why = screen_reply(m, state)
                if c is None:
                    rejected.append(why)
                    continue
                rd = m.content
                records[c["partition_id"]] = {"array_records": sorted(rd.array_records.keys()),
                                              "metric_records": sorted(rd.metric_records.keys()),
                                              "config_records": sorted(rd.config_records.keys()),
                                              "array_keys": sorted(next(iter(rd.array_records.values())).keys()),
                                              "metric_keys": sorted(next(iter(rd.metric_records.values())).keys())}
                accepted.append(c)
            if len(accepted) < fs.clients:
                raise RepnetError(f"round {r}: {len(accepted)} usable device replies of {fs.clients} "
                                  f"({'; '.join(rejected[:3]) or 'no replies'})")
            accepted.sort(key=lambda c: c["partition_id"])
            new = aggregate(strategy, r, accepted)
            state = {k: new[k].to(v.dtype) for k, v in state.items()}
            history.append({"round": r, "devices": [c["partition_id"] for c in accepted],
                            "bytes_sent_per_device": sent,
                            "bytes_received": {str(c["partition_id"]): c["wire_bytes"] for c in accepted},
                            "tensor_bytes_received": {str(c["partition_id"]): c["data_bytes"] for c in accepted},
                            "train_loss": {str(c["partition_id"]): c["loss"] for c in accepted},
                            "reply_records": {str(k): v for k, v in sorted(records.items())}})
        return {"framework": "flower", "strategy": fs.strategy, "clients": fs.clients, "rounds": fs.rounds,
                "local_epochs": fs.local_epochs, "history": history, "global_state": state,
                "model_bytes": int(sum(v.numel() * v.element_size() for v in state.values())),
                "bytes_per_device_per_round": {"sent": history[-1]["bytes_sent_per_device"],
                                               "received": max(history[-1]["bytes_received"].values())},
                "wall_time_s": time.time() - t0}


def make_apps(bound: dict | None = None, sink: dict | None = None):
    """``(server_app, client_app)``; ``bound``: run config taking precedence over the context's."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    bound = dict(bound or {})
    capp = ClientApp()

    @capp.train()
    def train(msg, context):
        fs = FleetSettings.from_run_config({**context.run_config, **bound})
        try:
            pid = int(context.node_config["partition-id"])
        except (KeyError, TypeError, ValueError):
            raise RepnetError("this SuperNode has no partition: start it with --node-config "
                              "\"partition-id=K num-partitions=N\"") from None
        cfg = msg.content.config_records.get("config")
        server_round = int(cfg["server-round"]) if cfg is not None and "server-round" in cfg else 0
        arrays, metrics = client_train(fs, pid, next(iter(msg.content.array_records.values())), server_round)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    sapp = ServerApp()

    @sapp.main()
    def main(grid, context):
        fs = FleetSettings.from_run_config({**context.run_config, **bound})
        res = FleetServer(fs).run(grid)
        if fs.out:
            save_fleet_result(res, fs.out)
        if sink is not None:
            sink.update(res)

    return sapp, capp


_APPS = make_apps()
server_app = _APPS[0]  # (one name per line: Flower's app check reads module-level assignments)
client_app = _APPS[1]


def save_fleet_result(res: dict, out) -> None:
    from repnet.storage import atomic_write_text, save_tensors

    out = FsPath(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(res["global_state"], out / "global_autoencoder.safetensors")
    atomic_write_text(out / "federated.json",
                      json.dumps({k: v for k, v in res.items() if k != "global_state"}, indent=2))


def simulate(fs: FleetSettings, cpus: int | None = None) -> dict:
    """The federation in Flower's simulation runtime (Ray actors, one thread each); the results
    with ``global_state`` (the averaged autoencoder)."""
    try:
        from repnet.federated.app import run_flower_simulation
    except ImportError:
        raise RepnetError("federated ProvIoT needs Flower: pip install 'repnet[federated]'") from None
    for k in range(fs.clients):  # a missing device folder is one line, before Ray starts
        folder = device_folder(fs.fleet, k)
        if not folder.is_dir() or not any(folder.glob("*.json")):
            raise RepnetError(f"{folder}: no trace files (*.json) - the device's benign set is empty")
    sink: dict = {}
    sapp, capp = make_apps(fs.run_config(), sink)
    cpus = max(1, min(cpus or os.cpu_count() or 1, fs.clients))
    return run_flower_simulation(sapp, capp, fs.clients, cpus, sink, object_store_mb=128)


def evaluate_fleet(fs: FleetSettings, state: dict, tests: dict[int, list[ProvGraph]]) -> dict:
    """Each device's detector (global autoencoder, its own DB and thresholds) on its own test windows;
    counts summed over the fleet."""
    from repnet.proviot.detector import evaluate, prf

    per_device, totals = {}, {}
    for k, graphs in tests.items():
        det = device_detector(_device(fs, k), state, fs.personal_epochs, seed=fs.settings.seed * 1000 + k)
        ev = evaluate(det, graphs)
        per_device[str(k)] = {kk: v for kk, v in ev.items() if kk != "alerts"}
        for cls, m in [("overall", ev["overall"])] + list(ev["per_attack"].items()):
            t = totals.setdefault(cls, [0, 0, 0])
            t[0] += m["tp"]
            t[2] += m["fn"]
        totals.setdefault("_fp", [0])[0] += ev["benign_false_alarms"]
    fp = totals.pop("_fp")[0]
    overall = prf(totals["overall"][0], fp, totals["overall"][2])
    per_attack = {c: prf(t[0], fp, t[2]) for c, t in sorted(totals.items()) if c != "overall"}
    return {"overall": overall, "per_attack": per_attack, "benign_false_alarms": fp,
            "missed_classes": [c for c, m in per_attack.items() if m["tp"] == 0], "per_device": per_device}


APP_TOML = """\
# A Flower app: repnet's ProvIoT ServerApp / ClientApp (federated provenance anomaly detection).
# Every SuperNode needs repnet installed, its own traces in {fleet}/device-K/, and is started with
#   flower-supernode --superlink HOST:PORT --node-config "partition-id=K num-partitions=N"
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "repnet-proviot"
version = "1.0.0"
description = "Federated ProvIoT autoencoder (repnet)"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "repnet"

[tool.flwr.app.components]
serverapp = "repnet.proviot.federated:server_app"
clientapp = "repnet.proviot.federated:client_app"

[tool.flwr.app.config]
{config}
"""


def write_fleet_app(folder, fs: FleetSettings) -> FsPath:
    """A Flower app folder (``pyproject.toml``) for ``flwr run`` (repnet.federated's folder rules)."""
    from repnet.federated.run import write_app_folder

    lines = [f"{k} = {json.dumps(v)}" for k, v in fs.run_config().items()]
    return write_app_folder(str(folder), APP_TOML.format(fleet=fs.fleet, config="\n".join(lines)))


def central_detector(fs: FleetSettings, graphs_by_device: dict[int, list[ProvGraph]]):
    """The centrally trained baseline: one detector on the union of the devices' benign windows."""
    from repnet.proviot.detector import train_detector

    allg = [g for k in sorted(graphs_by_device) for g in graphs_by_device[k]]
    return train_detector(allg, fs.settings)


def local_vectors(fs: FleetSettings, k: int) -> np.ndarray:
    return _device(fs, k).x
