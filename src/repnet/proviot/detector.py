"""The detector: an autoencoder on benign path vectors, trained through :func:`repnet.training.loop.fit`.

ProvIoT's model: ``50 -> 25 -> 12 -> 25 -> 50`` (ReLU between layers, linear output), mean
squared reconstruction error, Adam. Trained on the vectors of the K rarest paths of benign
windows only. Thresholds are chosen on *held-out benign* windows only (never on attacks):

* ``path_threshold``: the ``path_quantile`` (ProvIoT: 0.85) quantile of the held-out benign
  paths' errors; a path above it is *anomalous*;
* a window's score is its highest path error (the alert names that path); the window is flagged
  when its score exceeds ``window_threshold`` = the ``window_quantile`` quantile (default 1.0: the
  highest) of the held-out benign windows' scores, times ``margin`` (default 1.5: room for benign
  behaviour the held-out windows did not show; chosen on a development run of seed 0, the
  benchmark reports seed 1).

A model folder (:func:`save_model` / :func:`load_model`) holds ``detector.safetensors`` (the
weights and the thresholds, with their SHA-256: :mod:`repnet.storage`), ``freqdb.json`` and the
embedder. :func:`load_numpy_detector` reads the weights with numpy alone (checking the same
digest), so the steady-state monitor (:mod:`.monitor`) runs without importing torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path as FsPath

import numpy as np

from repnet.errors import RepnetError
from repnet.proviot.embed import load_embedder, make_embedder
from repnet.proviot.graph import ProvGraph
from repnet.proviot.paths import FrequencyDB, Path, rarest_paths

LAYERS = (50, 25, 12, 25, 50)
MODEL_FILES = ("detector.safetensors", "freqdb.json", "embedder.json", "doc2vec.safetensors", "model.json")


@dataclasses.dataclass
class DetectorSettings:
    k: int = 10  # rarest paths per window
    max_len: int = 6  # edges per path at most
    embedding: str = "hash"  # hash | doc2vec
    dim: int = 50
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    val_fraction: float = 0.25  # of the benign windows, held out for the thresholds
    path_quantile: float = 0.85
    window_quantile: float = 1.0
    margin: float = 1.5
    seed: int = 0

    def check(self) -> None:
        """Every setting in its range (repnet.limits), else one line."""
        from repnet.limits import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_LR, check_int, check_number

        check_int("k", self.k, 1, 10_000)
        check_int("max_len", self.max_len, 1, 1_000)
        check_int("dim", self.dim, 2, 1 << 16)
        check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_number("lr", self.lr, 0, MAX_LR, low_open=True)
        check_number("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_number("margin", self.margin, 0, 1e6, low_open=True)
        check_number("path_quantile", self.path_quantile, 0, 1, low_open=True)
        check_number("window_quantile", self.window_quantile, 0, 1, low_open=True)
        if self.embedding not in ("hash", "doc2vec"):
            raise RepnetError(f"embedding must be hash or doc2vec, got {self.embedding!r}")


def autoencoder(dim: int = 50):
    """ProvIoT's autoencoder for ``dim``-dimensional vectors (``dim -> dim/2 -> ~dim/4 -> dim/2 -> dim``)."""
    from torch import nn

    h1, h2 = max(2, round(dim / 2)), max(1, round(dim * 12 / 50))
    return nn.Sequential(nn.Linear(dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, h1), nn.ReLU(),
                         nn.Linear(h1, dim))


class VectorSet:
    """Path vectors as the (x, y) dataset :func:`repnet.training.loop.fit` takes (y: unused zeros)."""

    def __init__(self, x: np.ndarray):
        import torch

        self.x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        self.targets = [0] * len(self.x)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def train_config(s: DetectorSettings, n: int):
    from repnet.config.schema import TrainConfig

    return TrainConfig(dataset="proviot", epochs=s.epochs, batch_size=min(s.batch_size, max(1, n)), lr=s.lr,
                       lr_side=s.lr, optimizer="adam", label_smoothing=0.0, seed=s.seed, workers=0, device="cpu",
                       progress=False, profile_memory=False)


def fit_autoencoder(model, x: np.ndarray, s: DetectorSettings, seed: int | None = None, name: str = "proviot",
                    epochs: int | None = None) -> dict:
    """Train ``model`` on ``x`` through :func:`repnet.training.loop.fit` (MSE via ``objective``); returns
    ``{"train_time_s", "losses"}``."""
    import torch
    from torch import nn

    from repnet.training import loop

    if len(x) == 0:
        raise RepnetError("the benign set is empty: no benign path to train the detector on")
    cfg = train_config(s, len(x))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    mse = nn.MSELoss()

    def objective(xb, yb):
        return mse(model(xb), xb), None

    losses: list[float] = []
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    t0 = time.perf_counter()
    loop.fit(model, VectorSet(x), cfg, torch.device("cpu"), opt, seed=s.seed if seed is None else seed,
             objective=objective, on_epoch=lambda st, rec: losses.append(rec["train_loss"]), name=name)
    return {"train_time_s": time.perf_counter() - t0, "losses": losses}


def errors(model, x: np.ndarray) -> np.ndarray:
    """Per-vector mean squared reconstruction error (torch model)."""
    import torch

    if len(x) == 0:
        return np.zeros(0)
    with torch.no_grad():
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return ((model(xt) - xt) ** 2).mean(1).numpy().astype(np.float64)


# ----------------------------------------------------------------------------- numpy inference
class NumpyAE:
    """The autoencoder's forward pass in numpy (the monitor's: no torch in the process)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        n = len([k for k in weights if k.endswith(".weight")])
        self.layers = [(weights[f"{2 * i}.weight"].astype(np.float32), weights[f"{2 * i}.bias"].astype(np.float32))
                       for i in range(n)]

    def errors(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        if len(h) == 0:
            return np.zeros(0)
        x0 = h
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0)
        return ((h - x0) ** 2).mean(1).astype(np.float64)


def numpy_digest(tensors: dict[str, np.ndarray]) -> str:
    """:func:`repnet.storage.content_digest` of float32 tensors, computed with numpy (same bytes)."""
    h = hashlib.sha256()
    items = sorted(tensors.items())
    h.update(f"D{len(items)}".encode())
    for k, v in items:
        h.update(f"Vstr:{k!r};".encode())
        if v.dtype != np.float32:
            raise RepnetError("numpy_digest covers float32 tensors only")
        h.update(f"Ttorch.float32{tuple(v.shape)}".encode())
        if v.size:
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the detector
class Detector:
    """Frequency database + embedder + autoencoder + thresholds: scores windows, names alerts."""

    def __init__(self, db: FrequencyDB, embedder, ae, settings: DetectorSettings, path_threshold: float = float("inf"),
                 window_threshold: float = float("inf")):
        self.db, self.embedder, self.ae, self.s = db, embedder, ae, settings
        self.path_threshold, self.window_threshold = path_threshold, window_threshold

    def paths(self, g: ProvGraph) -> list[Path]:
        return rarest_paths(g, self.db, self.s.k, self.s.max_len)

    def path_errors(self, paths: list[Path]) -> np.ndarray:
        if not paths:
            return np.zeros(0)
        x = self.embedder.transform([p.words() for p in paths])
        return self.ae.errors(x) if isinstance(self.ae, NumpyAE) else errors(self.ae, x)

    def score(self, g: ProvGraph) -> dict:
        """``{"score", "flagged", "alert" (the worst path's paragraph), "anomalous_paths", "paths"}``."""
        paths = self.paths(g)
        errs = self.path_errors(paths)
        if len(errs) == 0:
            return {"score": 0.0, "flagged": False, "alert": None, "anomalous_paths": 0, "paths": 0}
        i = int(np.argmax(errs))
        score = float(errs[i])
        return {"score": score, "flagged": bool(score > self.window_threshold),
                "alert": paths[i].text(), "alert_error": score, "alert_log_regularity": paths[i].log_regularity,
                "anomalous_paths": int((errs > self.path_threshold).sum()), "paths": len(paths)}


def split_benign(graphs: list[ProvGraph], val_fraction: float, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(graphs))
    n_val = max(1, int(round(val_fraction * len(graphs)))) if len(graphs) > 1 else 0
    val = sorted(idx[:n_val].tolist())
    tr = sorted(idx[n_val:].tolist())
    return [graphs[i] for i in tr], [graphs[i] for i in val]


def prepare(benign: list[ProvGraph], s: DetectorSettings):
    """Frequency DB and embedder from the training windows; path vectors of train / held-out windows."""
    s.check()
    benign = [g for g in benign if g.edges]
    if not benign:
        raise RepnetError("the benign set is empty: no benign window with events to train on")
    train_g, val_g = split_benign(benign, s.val_fraction, s.seed)
    if not val_g:
        raise RepnetError("the benign set has one window: at least two are needed (one held out for the thresholds)")
    db = FrequencyDB.build(train_g)
    train_paths = [p for g in train_g for p in rarest_paths(g, db, s.k, s.max_len)]
    emb = make_embedder(s.embedding, s.dim, s.seed).fit([p.words() for p in train_paths])
    x = emb.transform([p.words() for p in train_paths])
    return db, emb, x, train_g, val_g


def calibrate(det: Detector, val_g: list[ProvGraph]) -> dict:
    """Set the thresholds from held-out benign windows only (module doc)."""
    s = det.s
    path_errs, window_scores = [], []
    for g in val_g:
        e = det.path_errors(det.paths(g))
        path_errs.extend(e.tolist())
        window_scores.append(float(e.max()) if len(e) else 0.0)
    det.path_threshold = float(np.quantile(path_errs, s.path_quantile)) if path_errs else float("inf")
    det.window_threshold = float(np.quantile(window_scores, s.window_quantile)) * s.margin
    return {"path_threshold": det.path_threshold, "window_threshold": det.window_threshold,
            "val_windows": len(val_g), "val_paths": len(path_errs)}


def train_detector(benign: list[ProvGraph], s: DetectorSettings | None = None) -> tuple[Detector, dict]:
    """The whole on-device training: frequency DB, embedder, autoencoder (``loop.fit``), thresholds."""
    import torch

    s = s or DetectorSettings()
    t0 = time.perf_counter()
    db, emb, x, train_g, val_g = prepare(benign, s)
    t_sum = time.perf_counter() - t0
    torch.manual_seed(s.seed)
    ae = autoencoder(s.dim)
    fit = fit_autoencoder(ae, x, s)
    ae.eval()
    det = Detector(db, emb, ae, s)
    cal = calibrate(det, val_g)
    info = {"train_windows": len(train_g), "train_paths": int(len(x)), "summarise_and_embed_s": t_sum,
            "detector_train_time_s": fit["train_time_s"], "final_loss": fit["losses"][-1] if fit["losses"] else None,
            **cal, "settings": dataclasses.asdict(s), "embedder": emb.describe()}
    return det, info


# ----------------------------------------------------------------------------- model folders
def _verify_model(folder):
    if not (FsPath(folder) / "detector.safetensors").is_file():
        raise RepnetError(f"{folder} does not hold a proviot model")


def model_kind():
    """The run-folder kind of a ``repnet proviot train`` model folder (:class:`repnet.storage.RunKind`; built on
    use: repnet.storage imports torch, which the steady-state monitor never does)."""
    from repnet.storage import RunKind

    return RunKind("proviot model", "detector.safetensors", MODEL_FILES, _verify_model, "repnet proviot train")


def save_model(det: Detector, folder, info: dict | None = None, overwrite: bool = False,
               claimed: bool = False) -> FsPath:
    """Write the model folder (``claimed``: the caller claimed it already, before training)."""
    from repnet.storage import atomic_write_text, claim_folder, save_tensors, set_run_state

    kind = model_kind()
    folder = FsPath(folder) if claimed else claim_folder(folder, kind=kind, overwrite=overwrite)
    state = {k: v.detach().cpu().float().contiguous() for k, v in det.ae.state_dict().items()}
    meta = {"settings": json.dumps(dataclasses.asdict(det.s)), "path_threshold": repr(det.path_threshold),
            "window_threshold": repr(det.window_threshold)}
    save_tensors(state, folder / "detector.safetensors", meta)
    atomic_write_text(folder / "freqdb.json", json.dumps(det.db.to_dict()))
    det.embedder.save(folder)
    atomic_write_text(folder / "model.json", json.dumps(info or {}, indent=2, default=str))
    set_run_state(folder, kind, "finished")
    return folder


def _read_common(folder):
    folder = FsPath(folder)
    if not (folder / "detector.safetensors").is_file():
        raise RepnetError(f"{folder} is not a proviot model (no detector.safetensors: train one with "
                          "`repnet proviot train`)")
    try:
        db = FrequencyDB.from_dict(json.loads((folder / "freqdb.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise RepnetError(f"{folder}/freqdb.json is missing or damaged") from None
    return folder, db


def _settings_from(meta: dict) -> tuple[DetectorSettings, float, float]:
    try:
        s = DetectorSettings(**json.loads(meta["settings"]))
        return s, float(meta["path_threshold"]), float(meta["window_threshold"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise RepnetError("the detector's metadata is damaged (settings / thresholds)") from None


def load_model(folder) -> Detector:
    """A saved model with the torch autoencoder."""
    from safetensors import safe_open

    from repnet.storage import read_safetensors

    folder, db = _read_common(folder)
    state = read_safetensors(folder / "detector.safetensors", "detector", require_digest=True)
    with safe_open(str(folder / "detector.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
    s, pt, wt = _settings_from(meta)
    ae = autoencoder(s.dim)
    ae.load_state_dict(state)
    ae.eval()
    return Detector(db, load_embedder(folder), ae, s, pt, wt)


def load_numpy_detector(folder) -> Detector:
    """A saved model whose autoencoder runs in numpy (no torch imported); digest checked."""
    from safetensors import safe_open

    folder, db = _read_common(folder)
    path = folder / "detector.safetensors"
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - header / size errors come in many types
        raise RepnetError(f"detector {path} is damaged or not a safetensors file ({type(e).__name__})") from None
    if meta.get("__sha256__") != numpy_digest(weights):
        raise RepnetError(f"detector {path} is damaged (its checksum does not match its tensors)")
    s, pt, wt = _settings_from(meta)
    return Detector(db, load_embedder(folder), NumpyAE(weights), s, pt, wt)


# ----------------------------------------------------------------------------- evaluation
def prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp, "fn": fn}


def evaluate(det: Detector, graphs: list[ProvGraph]) -> dict:
    """Window-level precision / recall / F1 overall and per attack class (an attack window is a
    positive; per class: that class's windows against all benign ones), and the alerts."""
    rows = [(g.label, g.name, det.score(g)) for g in graphs if g.edges]
    benign_fp = sum(1 for lab, _, r in rows if lab == "benign" and r["flagged"])
    benign_n = sum(1 for lab, _, _ in rows if lab == "benign")
    attacks = sorted({lab for lab, _, _ in rows if lab != "benign"})
    tp = sum(1 for lab, _, r in rows if lab != "benign" and r["flagged"])
    fn = sum(1 for lab, _, r in rows if lab != "benign" and not r["flagged"])
    out = {"overall": prf(tp, benign_fp, fn), "benign_windows": benign_n, "benign_false_alarms": benign_fp,
           "false_positive_rate": benign_fp / benign_n if benign_n else 0.0, "per_attack": {}}
    for a in attacks:
        atp = sum(1 for lab, _, r in rows if lab == a and r["flagged"])
        afn = sum(1 for lab, _, r in rows if lab == a and not r["flagged"])
        out["per_attack"][a] = {**prf(atp, benign_fp, afn), "windows": atp + afn}
    out["missed_classes"] = [a for a, m in out["per_attack"].items() if m["tp"] == 0]
    out["alerts"] = [{"label": lab, "name": name, "score": r["score"], "path": r["alert"]}
                     for lab, name, r in rows if r["flagged"]]
    return out
