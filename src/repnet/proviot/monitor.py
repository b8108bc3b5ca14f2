"""Steady-state summarisation + detection: follow a collector's output as it grows, and score.

The monitor is what runs on the device all the time, so it is kept small: it imports numpy, the
trace parser, the path selection, the hash embedding and the autoencoder's forward pass in numpy
(:func:`.detector.load_numpy_detector`) - never torch. Every ``interval`` seconds it parses the
new lines of the ``strace -f -ttt -yy`` output file and adds the new events to their job's window
(one per job: the sub-tree of each child of the traced root process, as in training); once a
job's root process has exited, it selects the window's K rarest paths, embeds and scores them,
prints an alert line if the window is flagged, and forgets the window. At the end it reports its own CPU time / wall time and peak resident memory (VmHWM).

    python -m repnet.proviot.monitor MODEL_DIR STRACE_OUTPUT --duration 60 [--interval 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from repnet.errors import RepnetError
from repnet.proviot.collect import StraceParser, TraceBuilder
from repnet.proviot.detector import load_numpy_detector
from repnet.proviot.graph import ProvGraph


def vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Monitor:
    def __init__(self, model_dir, aliases=()):
        self.det = load_numpy_detector(model_dir)
        if self.det.embedder.kind != "hash":
            raise RepnetError("the steady-state monitor runs the hash embedding (no gensim, no torch in the process)")
        self.builder = TraceBuilder("strace", [], list(aliases))
        self.parser = StraceParser(self.builder)
        self.open: dict[int, ProvGraph] = {}  # job root -> its window so far
        self.local: dict[int, dict[int, int]] = {}
        self.windows = 0
        self.alerts: list[dict] = []

    def feed(self, lines) -> None:
        for line in lines:
            self.parser.feed(line)

    def _job_of(self, tgid: int) -> int | None:
        procs, root = self.builder.trace.procs, self.builder.trace.root
        p, seen = tgid, set()
        while p in procs and p not in seen:
            seen.add(p)
            parent = procs[p][0]
            if parent == root:
                return p
            p = parent
        return None

    def step(self, final: bool = False) -> list[dict]:
        """Move the new events into their jobs' windows and score every job that ended (its root
        process exited; ``final``: every job); returns the alerts."""
        tr = self.builder.trace
        for t, s, e, d in tr.events:
            actor = s if tr.nodes[s][1] == "p" and e != "PROC_CREATE" else d
            job = self._job_of(tr.node_proc[actor]) if tr.node_proc[actor] >= 0 else None
            if job is None:
                continue
            g = self.open.setdefault(job, ProvGraph(name=str(job)))
            loc = self.local.setdefault(job, {})
            for n in (s, d):
                if n not in loc:
                    loc[n] = g.add_node(tr.nodes[n][1], tr.nodes[n][2])
            g.add_edge(t, loc[s], e, loc[d])
        tr.events.clear()  # the monitor keeps only the open jobs' windows
        out = []
        for job in [j for j in self.open if final or j in self.parser.exited]:
            g = self.open.pop(job)
            self.local.pop(job, None)
            r = self.det.score(g)
            self.windows += 1
            if r["flagged"]:
                a = {"job": job, "score": r["score"], "path": r["alert"]}
                out.append(a)
                self.alerts.append(a)
        self.builder.last.clear()  # an edge seen again later counts again (in its job's window)
        return out


def follow(model_dir, strace_file, duration: float, interval: float = 2.0, aliases=(), quiet: bool = False) -> dict:
    """Run the monitor on a growing strace output file for ``duration`` seconds; its own cost."""
    t0, c0 = time.time(), time.process_time()
    mon = Monitor(model_dir, aliases)
    pos, buf = 0, ""
    deadline = t0 + duration
    while True:
        now = time.time()
        try:
            with open(strace_file, "r", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        buf += chunk
        lines = buf.split("\n")
        buf = lines.pop()
        mon.feed(lines)
        for a in mon.step(final=now >= deadline):
            if not quiet:
                print(f"ALERT job {a['job']} score {a['score']:.4f}: {a['path']}", flush=True)
        if now >= deadline:
            break
        time.sleep(max(0.0, min(interval, deadline - time.time())))
    wall = time.time() - t0
    cpu = time.process_time() - c0
    hwm = vm_hwm_bytes()
    return {"wall_s": wall, "cpu_s": cpu, "cpu_percent": 100.0 * cpu / wall if wall else 0.0,
            "peak_rss_mb": hwm / 1e6 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            "windows_scored": mon.windows, "alerts": len(mon.alerts), "lines": mon.parser.lines,
            "torch_imported": "torch" in sys.modules}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repnet.proviot.monitor")
    p.add_argument("model")
    p.add_argument("strace_file")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--alias", action="append", default=[], metavar="PREFIX=LABEL")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        aliases = [tuple(x.split("=", 1)) for x in a.alias]
        res = follow(a.model, a.strace_file, a.duration, a.interval, aliases, a.quiet)
    except RepnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("PROVIOT_MONITOR " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
