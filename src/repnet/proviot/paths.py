"""Rareness-based summarisation: the frequency database, regularity scores, the K rarest causal
paths of a window, and the paths as paragraphs (ProvDetector, NDSS 2020; ProvIoT, ACNS 2024).

**Frequency database** (:class:`FrequencyDB`), learned from benign windows (each window is one
"time unit"), at the level of labels:

* ``H(e)``: windows in which the edge ``e = (source label, type, destination label)`` occurs;
* ``H_out(u)``: windows in which label ``u`` is the source of any edge;
* ``T(v)``: windows in which label ``v`` occurs; ``IN(v)`` = the fraction of those in which ``v``'s
  in-degree (distinct incoming ``(label, type)`` pairs in the window) takes its most common value,
  ``OUT(v)`` the same for the out-degree - how stable the node's neighbourhood is.

**Regularity** of a causal path ``P = v0 -e1-> v1 -e2-> ... -ek-> vk``::

    R(P) = prod_i  OUT(v_{i-1}) * M(e_i) * IN(v_i),      M(e) = H(e) / H_out(source label of e)

where an unseen label or edge gets the floor ``eps = 1 / (W + 1)`` (``W`` benign windows) in
place of its (zero) factor. Low R = rare. :func:`regularity` computes it, in logs.

**K rarest paths** (:func:`rarest_paths`): among the window's *causal* paths - edges in time
order (each edge no earlier than the one before it), starting at a node that has had no incoming
edge yet (a source at that time), of at most ``max_len`` edges - the K with the lowest R, distinct as label
sequences. (A path may end anywhere: files that are both read and written make cycles in which no
node is a sink; as every factor is <= 1, a path's extensions are never more regular than it, so the
rarest paths run as far as ``max_len`` or the causal order allows.) Found exactly by dynamic programming over the edges in time order: every node keeps
its K rarest paths of each length ending there (weights ``-log`` of the factors add up), so a
path's extension is considered as soon as its last edge is. The result is sorted by R, rarest
first, ties broken by the label sequence.

**Paragraph** (:func:`paragraph`): a path as words - node labels and edge types in order, e.g.
``/usr/bin/sh PROC_CREATE /usr/bin/curl CONNECT tcp:127.0.0.1:8000``.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from repnet.errors import RepnetError
from repnet.proviot.graph import ProvGraph


@dataclass
class FrequencyDB:
    windows: int = 0
    edge: Counter = field(default_factory=Counter)  # H(e)
    out_windows: Counter = field(default_factory=Counter)  # H_out(u)
    node: Counter = field(default_factory=Counter)  # T(v)
    in_deg: dict = field(default_factory=lambda: defaultdict(Counter))
    out_deg: dict = field(default_factory=lambda: defaultdict(Counter))

    def add(self, g: ProvGraph) -> None:
        """Count one benign window."""
        self.windows += 1
        elabels = g.edge_labels()
        ins: dict[str, set] = defaultdict(set)
        outs: dict[str, set] = defaultdict(set)
        for s, e, d in elabels:
            self.edge[(s, e, d)] += 1
            ins[d].add((s, e))
            outs[s].add((e, d))
        for u in outs:
            self.out_windows[u] += 1
        for v in set(g.labels):
            self.node[v] += 1
            self.in_deg[v][len(ins.get(v, ()))] += 1
            self.out_deg[v][len(outs.get(v, ()))] += 1

    @classmethod
    def build(cls, graphs) -> "FrequencyDB":
        db = cls()
        for g in graphs:
            db.add(g)
        if db.windows == 0:
            raise RepnetError("the benign set is empty: no benign window to learn the frequency database from")
        return db

    @property
    def eps(self) -> float:
        return 1.0 / (self.windows + 1)

    def in_score(self, v: str) -> float:
        n = self.node.get(v, 0)
        return max(self.in_deg[v].most_common(1)[0][1] / n, self.eps) if n else self.eps

    def out_score(self, v: str) -> float:
        n = self.node.get(v, 0)
        return max(self.out_deg[v].most_common(1)[0][1] / n, self.eps) if n else self.eps

    def transition(self, s: str, e: str, d: str) -> float:
        h, n = self.edge.get((s, e, d), 0), self.out_windows.get(s, 0)
        return max(h / n, self.eps) if h and n else self.eps

    def edge_weight(self, s: str, e: str, d: str) -> float:
        """``-log(OUT(s) M(e) IN(d))``: the edge's share of a path's rareness (>= 0)."""
        return -(math.log(self.out_score(s)) + math.log(self.transition(s, e, d)) + math.log(self.in_score(d)))

    # persistence (plain JSON-able values)
    def to_dict(self) -> dict:
        return {"windows": self.windows,
                "edge": [[s, e, d, n] for (s, e, d), n in sorted(self.edge.items())],
                "out_windows": sorted(self.out_windows.items()), "node": sorted(self.node.items()),
                "in_deg": {v: sorted(c.items()) for v, c in sorted(self.in_deg.items())},
                "out_deg": {v: sorted(c.items()) for v, c in sorted(self.out_deg.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "FrequencyDB":
        db = cls(windows=int(d["windows"]))
        db.edge = Counter({(s, e, t): int(n) for s, e, t, n in d["edge"]})
        db.out_windows = Counter({k: int(n) for k, n in d["out_windows"]})
        db.node = Counter({k: int(n) for k, n in d["node"]})
        for v, items in d["in_deg"].items():
            db.in_deg[v] = Counter({int(k): int(n) for k, n in items})
        for v, items in d["out_deg"].items():
            db.out_deg[v] = Counter({int(k): int(n) for k, n in items})
        return db


@dataclass(frozen=True)
class Path:
    """A causal path: node labels and edge types in order, with its regularity (``log R``)."""

    labels: tuple[str, ...]
    types: tuple[str, ...]
    log_regularity: float = field(default=math.nan, compare=False)

    @property
    def regularity(self) -> float:
        return math.exp(self.log_regularity)

    def words(self) -> list[str]:
        out = [self.labels[0]]
        for e, v in zip(self.types, self.labels[1:]):
            out += [e, v]
        return out

    def text(self) -> str:
        return " ".join(self.words())


def regularity(db: FrequencyDB, labels, types) -> float:
    """``log R(P)`` of the path with these node labels and edge types (module doc)."""
    return -sum(db.edge_weight(s, e, d) for s, e, d in zip(labels, types, labels[1:]))


def paragraph(path: Path) -> str:
    return path.text()


def rarest_paths(g: ProvGraph, db: FrequencyDB, k: int = 10, max_len: int = 6) -> list[Path]:
    """The ``k`` rarest causal paths of ``g`` (module doc), rarest first."""
    if k < 1 or max_len < 1:
        raise RepnetError(f"k and max_len must be >= 1, got k={k}, max_len={max_len}")
    n = len(g.labels)
    has_in = [False] * n  # whether an edge into the node came already (in causal order)
    # best[v][L]: up to k (weight, node ids, types) of the rarest paths of L edges ending at v
    best: list[dict[int, list]] = [defaultdict(list) for _ in range(n)]
    weight_cache: dict[tuple, float] = {}
    for _, u, e, v in g.sorted_edges():
        key = (g.labels[u], e, g.labels[v])
        w = weight_cache.get(key)
        if w is None:
            w = weight_cache[key] = db.edge_weight(*key)
        cands = []
        if not has_in[u]:  # u is a source so far: a path may start here
            cands.append((w, (u, v), (e,)))
        for length, items in best[u].items():
            if length >= max_len:
                continue
            for pw, nodes, types in items:
                cands.append((pw + w, nodes + (v,), types + (e,)))
        for c in cands:
            _insert(best[v][len(c[2])], c, k, g.labels)
        has_in[v] = True
    finals: dict[tuple, tuple] = {}
    for v in range(n):
        for items in best[v].values():
            for w, nodes, types in items:
                labs = tuple(g.labels[i] for i in nodes)
                sig = (labs, types)
                if sig not in finals or finals[sig] < w:
                    finals[sig] = w
    ranked = sorted(finals.items(), key=lambda it: (-it[1], it[0]))[:k]
    return [Path(labs, types, -w) for (labs, types), w in ranked]


def _insert(items: list, cand: tuple, k: int, labels: list[str]) -> None:
    """Keep ``items`` the k heaviest (rarest) distinct label sequences, heaviest first."""
    w, nodes, types = cand
    sig = (tuple(labels[i] for i in nodes), types)
    for i, (pw, pn, pt) in enumerate(items):
        if (tuple(labels[j] for j in pn), pt) == sig:
            if pw >= w:
                return
            items.pop(i)
            break
    if len(items) >= k and items[-1][0] >= w:
        return
    items.append(cand)
    items.sort(key=lambda c: -c[0])
    del items[k:]
