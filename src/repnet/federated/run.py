"""Federated learning of adapters, the front end: a Flower federation in one call.

The frozen backbone stays on every device; only the method's trainable state travels (Rep-Net
modules, head, trained biases), as Flower ``ArrayRecord`` objects. :func:`run_federated` runs the apps
(:mod:`repnet.federated.app`) in Flower's simulation runtime on this machine; the same apps run on a
real fleet with ``flwr run``, and :func:`write_app` writes that app folder (its ``pyproject.toml``
replaced only when this package wrote it and nobody edited it). docs/federated.md.

    repnet federated --dataset digits --clients 4 --rounds 5 --partition dirichlet:0.5
"""
from __future__ import annotations

import json
from pathlib import Path

from repnet.errors import RepnetError
from repnet.storage import RUN_FILE, TMP_PREFIX, atomic_write_text, read_run_file
from repnet.federated.core import RUN, STRATEGIES, Settings, partition, state_bytes

__all__ = ["run_federated", "write_app", "partition", "state_bytes", "Settings", "STRATEGIES", "RUN"]


def _settings(overrides: dict, clients: int, rounds: int, local_epochs: int, scheme: str, out_dir: str | None,
              resume: bool, overwrite: bool, strategy: str, strategy_options: dict | None, min_clients: int,
              timeout: float) -> Settings:
    from repnet.config.recipes import make_config

    make_config(overrides)  # a bad key or value is one line before any process starts
    return Settings(dict(overrides), clients=clients, rounds=rounds, local_epochs=local_epochs, partition=scheme,
                    strategy=strategy, strategy_options=dict(strategy_options or {}), min_clients=min_clients,
                    timeout=timeout, out=str(Path(out_dir).resolve()) if out_dir else "", resume=resume,
                    overwrite=overwrite)


def _require_flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise RepnetError("federated learning needs Flower: pip install 'repnet[federated]' "
                          "(bash scripts/setup.sh installs it)") from None


def run_federated(overrides: dict, clients: int = 4, rounds: int = 5, local_epochs: int = 1,
                  scheme: str = "iid", out_dir: str | None = None, progress: bool = True, resume: bool = False,
                  on_round=None, overwrite: bool = False, strategy: str = "fedavg",
                  strategy_options: dict | None = None, min_clients: int = 0, timeout: float = 3600.0,
                  cpus: int | None = None) -> dict:
    """A Flower simulation of ``clients`` clients learning ``method``'s trainable state together.

    ``overrides``: training config keys (dataset, backbone, method, options, image_size, lr, ...).
    ``scheme``: ``iid`` or ``dirichlet:ALPHA``; ``strategy``: fedavg | fedprox | fedadam | fedyogi
    (``strategy_options``: proximal_mu, eta, eta_l, beta_1, beta_2, tau). With ``out_dir``: an
    atomic checkpoint after every round, ``results.json`` and the final adapter; ``resume=True``
    continues it bit-identically (``rounds`` may grow). ``on_round(r)`` runs after each round's
    checkpoint (a hook for tests). Returns the results (per-round accuracy, bytes per client
    counted from the messages, the per-client training memory).
    """
    _require_flower()
    from repnet.federated.app import simulate

    s = _settings(overrides, clients, rounds, local_epochs, scheme, out_dir, resume, overwrite, strategy,
                  strategy_options, min_clients, timeout)
    return simulate(s, progress=progress, on_round=on_round, cpus=cpus)


def write_app(folder: str, overrides: dict, clients: int = 2, rounds: int = 3, local_epochs: int = 1,
              scheme: str = "iid", out_dir: str | None = None, strategy: str = "fedavg",
              strategy_options: dict | None = None, min_clients: int = 0, timeout: float = 3600.0) -> Path:
    """Write a Flower app folder (``pyproject.toml``) that ``flwr run`` deploys to a SuperLink."""
    from repnet.federated.app import app_toml

    s = _settings(overrides, clients, rounds, local_epochs, scheme, out_dir, False, False, strategy,
                  strategy_options, min_clients, timeout)
    return write_app_folder(folder, app_toml(s, str(Path(folder))))


#: The kind recorded in a Flower app folder's :data:`repnet.storage.RUN_FILE`.
APP_KIND = "Flower app"


def write_app_folder(folder: str, text: str) -> Path:
    """Write ``folder/pyproject.toml`` into a new or empty folder; an existing one is replaced only if
    repnet wrote it (its SHA-256 is recorded beside it in :data:`repnet.storage.RUN_FILE`) and nobody
    edited it since. Anything else in the folder is refused, before anything is written."""
    import hashlib

    path = Path(folder)
    target = path / "pyproject.toml"
    if path.exists() and not path.is_dir():
        raise RepnetError(f"--flower-app {folder} is a file, not a folder")
    record = read_run_file(path) if path.is_dir() else None
    if record is not None and record["kind"] != APP_KIND:
        raise RepnetError(f"--flower-app {folder} holds a {record['kind']}: give a new or empty folder for the Flower app")
    entries = sorted(p.name for p in path.iterdir() if p.name != RUN_FILE and not p.name.startswith(TMP_PREFIX)) \
        if path.is_dir() else []
    ours = record is not None and target.is_file() and \
        hashlib.sha256(target.read_bytes()).hexdigest() == record.get("sha256")
    if "pyproject.toml" in entries and not ours:
        raise RepnetError(f"{target} was not written by repnet (or was edited since): it is left as it is; give a new "
                          "or empty folder for the Flower app")
    other = [n for n in entries if n != "pyproject.toml"]
    if other:
        raise RepnetError(f"--flower-app {folder} holds other files ({', '.join(other[:3])}): give a new or empty "
                          "folder for the Flower app")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepnetError(f"cannot create --flower-app {folder}: {e.strerror or e}") from None
    atomic_write_text(target, text)
    atomic_write_text(path / RUN_FILE, json.dumps({"kind": APP_KIND, "state": "finished",
                                                    "sha256": hashlib.sha256(text.encode()).hexdigest()}) + "\n")
    return target
