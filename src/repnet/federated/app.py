"""The Flower app: ``server_app`` and ``client_app`` (components for ``flwr run``), the simulation.

The ServerApp runs the rounds of :class:`repnet.federated.core.Server` with a Flower strategy and writes
the run folder on the SuperLink's machine; the ClientApp trains the local adapter of
:class:`repnet.federated.core.LocalClient` (each SuperNode started with ``--node-config
"partition-id=K num-partitions=N"``). ``repnet.flower_app:server_app`` / ``:client_app`` are the names
an app folder's ``pyproject.toml`` uses; :func:`simulate` runs the same two apps in Flower's
simulation runtime (Ray actors, one CPU each). docs/federated.md, "On a real fleet".
"""
from __future__ import annotations

import os
import threading

from repnet.errors import RepnetError
from repnet.federated.core import LocalClient, Server, Settings

__all__ = ["make_apps", "server_app", "client_app", "simulate", "APP_TOML"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry would phone home

_CLIENTS: dict[tuple, LocalClient] = {}  # per process: a client's model and shard, built once
_LOCK = threading.Lock()


def _client(rc: dict, node_config: dict) -> tuple[LocalClient, Settings]:
    s = Settings.from_run_config(rc)
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise RepnetError("this SuperNode has no partition: start it with --node-config "
                          "\"partition-id=K num-partitions=N\"") from None
    key = (repr(sorted(rc.items())), pid, n)
    with _LOCK:
        if key not in _CLIENTS:
            if len(_CLIENTS) >= 8:
                _CLIENTS.clear()
            threads = int(os.environ.get("REPNET_CLIENT_THREADS", "0"))
            if threads:
                import torch

                torch.set_num_threads(threads)
            _CLIENTS[key] = LocalClient(s, pid, n)
    return _CLIENTS[key], s


def make_apps(bound: dict | None = None, sink: dict | None = None, server: Server | None = None):
    """``(server_app, client_app)``. ``bound``: run config that takes precedence over the
    context's (the simulation passes its settings this way); ``server``: the ServerApp's work, made
    already (else made from the run config when the ServerApp starts); ``sink`` receives the results."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    bound = dict(bound or {})
    capp = ClientApp()

    @capp.train()
    def train(msg, context):
        client, _ = _client({**context.run_config, **bound}, context.node_config)
        cfg = msg.content.config_records.get("config")
        mu = float(cfg.get("proximal-mu", 0.0)) if cfg is not None else 0.0
        server_round = int(cfg["server-round"]) if cfg is not None and "server-round" in cfg else 0
        arrays, metrics = client.train(next(iter(msg.content.array_records.values())), server_round, mu)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    sapp = ServerApp()

    @sapp.main()
    def main(grid, context):
        work = server if server is not None else Server(Settings.from_run_config({**context.run_config, **bound}))
        res = work.run(grid)
        if sink is not None:
            sink.update(res)

    return sapp, capp


server_app, client_app = make_apps()


def simulate(settings: Settings, progress: bool = True, on_round=None, cpus: int | None = None) -> dict:
    """Run the federation in Flower's simulation runtime on this machine; returns the results.

    One Ray actor per CPU (``cpus``, default all cores but at most ``settings.clients``), each
    training one client at a time with one thread.
    """
    cpus = max(1, min(cpus or os.cpu_count() or 1, settings.clients))
    sink: dict = {}
    server = Server(settings, progress=progress, on_round=on_round)  # bad settings / run folder: before Ray starts
    sapp, capp = make_apps(settings.run_config(), sink, server)
    return run_flower_simulation(sapp, capp, settings.clients, cpus, sink)


def run_flower_simulation(sapp, capp, clients: int, cpus: int, sink: dict, object_store_mb: int = 256) -> dict:
    """Flower's simulation runtime for ``clients`` SuperNodes on ``cpus`` Ray actors (one thread each),
    its own logs and warnings kept out of the terminal; the results the ServerApp put in ``sink``. A
    :class:`RepnetError` inside an app is raised as it is (one line)."""
    import logging
    import warnings

    from flwr.simulation import run_simulation

    os.environ.setdefault("REPNET_CLIENT_THREADS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # (run_simulation's deprecation notice; failures are in the results)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=sapp, client_app=capp, num_supernodes=clients,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                         "logging_level": logging.ERROR, "log_to_driver": False,
                                                         "object_store_memory": object_store_mb * 1024 * 1024}})
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, RepnetError):
            raise cause from None
        raise
    finally:
        flwr_logger.setLevel(level)
    if not sink:
        raise RepnetError("the Flower simulation ended without results (see the log above)")
    return sink


#: pyproject.toml of a Flower app folder for ``flwr run`` (``repnet federated --flower-app DIR``).
APP_TOML = """\
# A Flower app: repnet's ServerApp / ClientApp (federated learning of adapters).
# Every SuperNode needs repnet installed and is started with
#   flower-supernode --superlink HOST:PORT --node-config "partition-id=K num-partitions=N"
# Run with: flwr run {folder} <superlink-connection> --stream
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "repnet-federated"
version = "1.0.0"
description = "Federated learning of adapters over one frozen backbone (repnet)"
license = "MIT"
dependencies = []  # repnet (and flwr) are installed where the apps run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "repnet"

[tool.flwr.app.components]
serverapp = "repnet.flower_app:server_app"
clientapp = "repnet.flower_app:client_app"

[tool.flwr.app.config]
{config}
"""


def app_toml(settings: Settings, folder: str = ".") -> str:
    import json

    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.run_config().items()]
    return APP_TOML.format(folder=folder, config="\n".join(lines))
