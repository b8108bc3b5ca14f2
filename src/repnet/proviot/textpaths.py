"""Causal paths given as text: the format public provenance-IDS artefacts publish.

One path per line, node labels and edge types separated by whitespace, alternating and starting
and ending with a node::

    /bin/dash PROC_CREATE /usr/bin/app READ_WRITE /var/lib/app.db

An edge type is a token of capitals, digits and underscores starting with a capital
(``PROC_CREATE``, ``READ_WRITE``, ``SOCK_ESTABLISHED``); a node label is anything else without
whitespace. Blank lines and lines starting with ``#`` are skipped. :func:`read_paths` refuses a
file with no edge types, or a line that does not alternate, with one line naming it;
:func:`write_paths` writes paths back (atomically) so that reading them gives the same paths.

:func:`train_text_detector` learns a detector from a benign file (frequency database over the
paths, embedding, autoencoder through :func:`repnet.training.loop.fit`, the path threshold at the
``path_quantile`` of held-out benign paths); :func:`score_text_paths` scores another file, path by
path.
"""
from __future__ import annotations

import math
import re
from pathlib import Path as FsPath

import numpy as np

from repnet.errors import RepnetError
from repnet.proviot.graph import ProvGraph
from repnet.proviot.paths import FrequencyDB, Path, regularity

EDGE_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def parse_line(line: str, where: str = "") -> Path | None:
    toks = line.split()
    if not toks or toks[0].startswith("#"):
        return None
    if len(toks) < 3 or len(toks) % 2 == 0:
        raise RepnetError(f"{where}: a path is node EDGE_TYPE node [EDGE_TYPE node ...]; got {len(toks)} token(s)")
    types = toks[1::2]
    labels = toks[0::2]
    bad = [t for t in types if not EDGE_TYPE.match(t)]
    if bad:
        raise RepnetError(f"{where}: '{bad[0]}' stands where an edge type (e.g. PROC_CREATE) must")
    return Path(tuple(labels), tuple(types), math.nan)


def read_paths(path) -> list[Path]:
    """The paths of a text file (module doc); one-line errors for what is not such a file."""
    p = FsPath(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RepnetError(f"path file {p} not found") from None
    except IsADirectoryError:
        raise RepnetError(f"path file {p} is a folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RepnetError(f"cannot read path file {p}: {getattr(e, 'strerror', None) or 'not text'}") from None
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise RepnetError(f"path file {p} holds no paths")
    if not any(EDGE_TYPE.match(t) for _, ln in lines for t in ln.split()[1::2]):
        raise RepnetError(f"path file {p} has no edge types (expected lines like "
                          "'/bin/dash PROC_CREATE /usr/bin/app READ_WRITE /var/lib/app.db')")
    return [parse_line(ln, f"{p} line {n}") for n, ln in lines]


def write_paths(paths: list[Path], path) -> None:
    from repnet.storage import atomic_write_text

    for q in paths:
        if any(not lab or any(c.isspace() for c in lab) for lab in q.labels):
            raise RepnetError(f"node label in {q.text()!r} is empty or holds whitespace: it cannot be written as text")
        if any(not EDGE_TYPE.match(t) for t in q.types):
            raise RepnetError(f"edge type in {q.text()!r} is not an EDGE_TYPE token")
    atomic_write_text(path, "".join(q.text() + "\n" for q in paths))


def path_graph(q: Path) -> ProvGraph:
    """A path as a one-path graph (for the frequency database)."""
    g = ProvGraph()
    ids = [g.add_node("?", lab) for lab in q.labels]
    for i, e in enumerate(q.types):
        g.add_edge(float(i), ids[i], e, ids[i + 1])
    return g


def train_text_detector(benign: list[Path], settings=None):
    """A detector from benign text paths (module doc): ``(Detector, info)``."""
    import torch

    from repnet.proviot.detector import Detector, DetectorSettings, autoencoder, errors, fit_autoencoder
    from repnet.proviot.embed import make_embedder

    s = settings or DetectorSettings()
    s.check()
    if not benign:
        raise RepnetError("the benign set is empty: no benign path to train on")
    rng = np.random.default_rng(s.seed)
    idx = rng.permutation(len(benign))
    n_val = max(1, int(round(s.val_fraction * len(benign))))
    if len(benign) - n_val < 1:
        raise RepnetError("the benign set has one path: at least two are needed (one held out for the threshold)")
    val = [benign[i] for i in sorted(idx[:n_val])]
    train = [benign[i] for i in sorted(idx[n_val:])]
    db = FrequencyDB.build([path_graph(q) for q in train])
    emb = make_embedder(s.embedding, s.dim, s.seed).fit([q.words() for q in train])
    x = emb.transform([q.words() for q in train])
    torch.manual_seed(s.seed)
    ae = autoencoder(s.dim)
    fit = fit_autoencoder(ae, x, s)
    ae.eval()
    det = Detector(db, emb, ae, s)
    ev = errors(ae, emb.transform([q.words() for q in val]))
    det.path_threshold = float(np.quantile(ev, s.path_quantile))
    det.window_threshold = det.path_threshold
    return det, {"train_paths": len(train), "val_paths": len(val), "path_threshold": det.path_threshold,
                 "detector_train_time_s": fit["train_time_s"], "mode": "text-paths"}


def score_text_paths(det, paths: list[Path]) -> list[dict]:
    """Per path: its error, whether it is anomalous (above the path threshold) and its regularity."""
    errs = det.path_errors(paths)
    return [{"path": q.text(), "error": float(e), "anomalous": bool(e > det.path_threshold),
             "log_regularity": regularity(det.db, q.labels, q.types)} for q, e in zip(paths, errs)]
