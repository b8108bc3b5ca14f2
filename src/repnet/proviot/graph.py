"""The provenance graph of a window: nodes (processes, files, sockets) and time-stamped edges.

A :class:`ProvGraph` is one window of a trace: the events whose process lies in one job's process
tree (or the whole trace where it has no windows). Node ``i`` has a ``kind`` (``p`` / ``f`` /
``s``) and a ``label`` (executable, path, service address); process *instances* are distinct nodes
with the same label (two ``cat`` runs are two nodes labelled ``/usr/bin/cat``). Each edge is
``(time, u, type, v)``, one per (u, type, v): its first occurrence (the collector already merged
repeats); its frequency in the window is kept in ``counts``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from repnet.proviot.collect import Trace


@dataclass
class ProvGraph:
    kinds: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    edges: list[tuple[float, int, str, int]] = field(default_factory=list)
    label: str = "benign"  # what ran in the window: benign or the attack class
    name: str = ""
    counts: dict = field(default_factory=dict)

    def add_node(self, kind: str, label: str) -> int:
        self.kinds.append(kind)
        self.labels.append(label)
        return len(self.labels) - 1

    def add_edge(self, t: float, u: int, etype: str, v: int) -> None:
        key = (u, etype, v)
        if key in self.counts:
            self.counts[key] += 1
            return
        self.counts[key] = 1
        self.edges.append((t, u, etype, v))

    def sorted_edges(self) -> list[tuple[float, int, str, int]]:
        """Edges in causal (time) order; ties keep the order they were added in."""
        return sorted(self.edges, key=lambda e: e[0])

    def edge_labels(self) -> set[tuple[str, str, str]]:
        return {(self.labels[u], e, self.labels[v]) for _, u, e, v in self.edges}

    def __len__(self) -> int:
        return len(self.edges)


def graph_from_edges(edges: list[tuple[float, str, str, str, str, str]], label: str = "benign",
                     name: str = "") -> ProvGraph:
    """A graph from ``(time, src_kind:src_id, src_label, type, dst_kind:dst_id, dst_label)`` rows
    (hand-built graphs: tests, docs)."""
    g = ProvGraph(label=label, name=name)
    ids: dict[str, int] = {}

    def node(nid, lab):
        if nid not in ids:
            ids[nid] = g.add_node(nid.split(":", 1)[0], lab)
        return ids[nid]

    for t, su, sl, e, dv, dl in edges:
        g.add_edge(float(t), node(su, sl), e, node(dv, dl))
    return g


def window_graphs(trace: Trace, include_unlabelled: bool = False) -> list[ProvGraph]:
    """One :class:`ProvGraph` per window of ``trace`` (in window order); a trace without windows is
    one window labelled by its ``meta['label']`` (default ``benign``). Events of processes outside
    every window (the session script itself) are left out unless ``include_unlabelled``."""
    if not trace.windows:
        g = ProvGraph(label=str(trace.meta.get("label", "benign")), name=" ".join(trace.command)[:80])
        local: dict[int, int] = {}
        for t, s, e, d in trace.events:
            for n in (s, d):
                if n not in local:
                    local[n] = g.add_node(trace.nodes[n][1], trace.nodes[n][2])
            g.add_edge(t, local[s], e, local[d])
        return [g]
    owner = trace.window_of()
    graphs = [ProvGraph(label=w["label"], name=w.get("name", "")) for w in trace.windows]
    extra = ProvGraph(label="unlabelled", name="outside the windows")
    locals_: list[dict[int, int]] = [{} for _ in graphs] + [{}]
    for t, s, e, d in trace.events:
        actor = d if trace.nodes[d][1] == "p" and trace.nodes[s][1] != "p" else s
        if trace.nodes[actor][1] != "p":
            actor = d
        w = owner.get(trace.node_proc[actor])
        if e == "PROC_CREATE":  # the edge into a window's root belongs to the window
            w = owner.get(trace.node_proc[d], w)
        if w is None:
            if not include_unlabelled:
                continue
            w = len(graphs)
        g = graphs[w] if w < len(graphs) else extra
        loc = locals_[w]
        for n in (s, d):
            if n not in loc:
                loc[n] = g.add_node(trace.nodes[n][1], trace.nodes[n][2])
        g.add_edge(t, loc[s], e, loc[d])
    return graphs + ([extra] if include_unlabelled and extra.edges else [])
