"""System-call provenance collection: strace and auditd behind one interface, and the trace file.

A *trace* is what one collection of a command (or of a running PID) saw, already reduced to
provenance events: ``(time, source node, edge type, destination node)`` over three kinds of node
- processes (labelled by their executable), files (path) and sockets (protocol and service
address) - plus the process tree (who created whom) and the *windows* (process sub-trees with a
label: the jobs of a workload session, ``benign`` or the attack class that ran in them).

Edge types (information flows from source to destination):

=============  ==================  ==========================================================
type           source -> dest      system calls
=============  ==================  ==========================================================
PROC_CREATE    process -> process  clone / fork / vfork (the child, labelled by what it runs)
PROC_EXEC      process -> process  execve in a process that had already done something
FILE_EXEC      file -> process     the executable (a ``/memfd:NAME`` for fileless execution)
READ           file -> process     open for reading, read / pread / readv
WRITE          process -> file     open for writing / creating, write / pwrite / writev,
                                   rename (the new name)
UNLINK         process -> file     unlink / unlinkat
CONNECT        process -> socket   connect
ACCEPT         socket -> process   accept / accept4
SEND / RECV    process <-> socket  write / sendto / sendmsg, read / recvfrom / recvmsg
=============  ==================  ==========================================================

Collectors (:func:`collector`): ``strace`` (``strace -f -yy``, works as root or on one's own
processes, the higher overhead) and ``auditd`` (the kernel audit subsystem, rules confined to the
traced process tree through its login uid; needs ``auditd`` / ``auditctl`` and a kernel that lets
this machine control auditing: :meth:`AuditdCollector.available` says why not where not). Both
produce the same trace format; auditd sees opens, not every read / write (its READ / WRITE edges
come from the open flags).

Labels are normalised so that the same behaviour gets the same label in every run: ``aliases``
(path prefixes such as a workload's temporary root -> ``$ROOT``, socket addresses -> a service
port), all-digit path components and numbers of 3+ digits inside names -> ``N``, ``mkstemp``-style
names -> ``tmp*``; pipes, ttys and
``/dev`` character devices are not nodes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from repnet.errors import RepnetError

FORMAT = "repnet-proviot-trace"
VERSION = 1
EDGE_TYPES = ("PROC_CREATE", "PROC_EXEC", "FILE_EXEC", "READ", "WRITE", "UNLINK", "CONNECT", "ACCEPT", "SEND", "RECV")
#: what the source / destination of each edge type is (p: process, f: file, s: socket)
EDGE_KINDS = {"PROC_CREATE": ("p", "p"), "PROC_EXEC": ("p", "p"), "FILE_EXEC": ("f", "p"), "READ": ("f", "p"),
              "WRITE": ("p", "f"), "UNLINK": ("p", "f"), "CONNECT": ("p", "s"), "ACCEPT": ("s", "p"),
              "SEND": ("p", "s"), "RECV": ("s", "p")}

STRACE_SYSCALLS = ("execve,execveat,clone,clone3,fork,vfork,open,openat,creat,read,write,pread64,pwrite64,readv,"
                   "writev,connect,accept,accept4,sendto,recvfrom,sendmsg,recvmsg,memfd_create,rename,renameat,"
                   "renameat2,unlink,unlinkat")


# ----------------------------------------------------------------------------- labels
_DIGITS = re.compile(r"^\d+$")
_NUMBER = re.compile(r"\d{3,}")  # a number inside a name (temp files like '#2147143', pids)
_MKSTEMP = re.compile(r"^(tmp|\.tmp-?)[A-Za-z0-9_]{6,}")
_EPHEMERAL = 32768  # Linux's default ip_local_port_range starts here


def normalise_path(path: str, aliases: list[tuple[str, str]] = ()) -> str:
    """The label of a file path (module doc): aliases first (longest prefix), then per component."""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    for prefix, repl in sorted(aliases, key=lambda a: -len(a[0])):
        if prefix.startswith("/") and (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
            path = repl + path[len(prefix.rstrip("/")):]
            break
    parts = []
    for c in path.split("/"):
        if _DIGITS.match(c):
            c = "N"
        elif _MKSTEMP.match(c):
            c = "tmp*"
        else:
            c = _NUMBER.sub("N", c)
        parts.append(c)
    return "/".join(parts)


def socket_label(proto: str, local: str | None, remote: str | None, aliases: list[tuple[str, str]] = ()) -> str:
    """``tcp:ADDR:PORT`` of the service side of a connection (the endpoint whose port is not an
    ephemeral one), aliases applied to ``ADDR:PORT``."""
    amap = dict(aliases)

    def port(ep):
        try:
            return int(ep.rsplit(":", 1)[1])
        except (AttributeError, IndexError, ValueError):
            return None

    cands = [ep for ep in (remote, local) if ep]
    for ep in cands:
        if ep in amap:
            return f"{proto}:{amap[ep]}"
    service = next((ep for ep in cands if port(ep) is not None and port(ep) < _EPHEMERAL), None)
    if service is None:
        service = min(cands, key=lambda ep: port(ep) or 1 << 20) if cands else "?"
    if port(service) is not None and port(service) >= _EPHEMERAL:
        service = service.rsplit(":", 1)[0] + ":EPH"
    return f"{proto}:{service}"


# ----------------------------------------------------------------------------- the trace
@dataclass
class Trace:
    """One collection, reduced to provenance (module doc). ``nodes[i] = (id, kind, label)``;
    ``events[j] = (time, src index, edge type, dst index)``; ``procs[tgid] = (parent tgid, first exe)``;
    ``node_proc[i]`` = the tgid of a process node (-1 for files and sockets); ``windows``:
    ``[{"root": tgid, "label": str, "name": str}]`` (empty: the whole trace is one window)."""

    collector: str
    command: list[str]
    nodes: list[tuple[str, str, str]] = field(default_factory=list)
    events: list[tuple[float, int, str, int]] = field(default_factory=list)
    procs: dict[int, tuple[int, str]] = field(default_factory=dict)
    node_proc: list[int] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)
    root: int = -1
    meta: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"collector": self.collector, "command": list(self.command), "root": self.root,
                "nodes": [list(n) for n in self.nodes], "node_proc": list(self.node_proc),
                "events": [[round(t, 6), s, e, d] for t, s, e, d in self.events],
                "procs": {str(k): list(v) for k, v in sorted(self.procs.items())},
                "windows": self.windows, "meta": self.meta}

    def window_of(self) -> dict[int, int]:
        """tgid -> index of the window whose root is its nearest ancestor (windows: sub-trees)."""
        roots = {w["root"]: i for i, w in enumerate(self.windows)}
        out: dict[int, int] = {}
        for pid in self.procs:
            p, seen = pid, set()
            while p not in roots and p in self.procs and p not in seen:
                seen.add(p)
                p = self.procs[p][0]
            if p in roots:
                out[pid] = roots[p]
        return out


def trace_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` as JSON, atomically, with the SHA-256 of its content."""
    from repnet.storage import atomic_write_text

    body = trace.body()
    doc = {"format": FORMAT, "version": VERSION, "sha256": trace_digest(body), **body}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    return Path(path)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace file; anything that is not an intact repnet trace is one line."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RepnetError(f"trace {path} not found") from None
    except IsADirectoryError:
        raise RepnetError(f"trace {path} is a folder, not a trace file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise RepnetError(f"{path} is not a trace (not a repnet proviot trace file: collect one with "
                          "`repnet proviot collect -- CMD`)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RepnetError(f"{path} is not a trace (no '{FORMAT}' header: collect one with "
                          "`repnet proviot collect -- CMD`)")
    if doc.get("version") != VERSION:
        raise RepnetError(f"trace {path} has version {doc.get('version')!r}; this repnet reads version {VERSION}")
    body = {k: v for k, v in doc.items() if k not in ("format", "version", "sha256")}
    if doc.get("sha256") != trace_digest(body):
        raise RepnetError(f"trace {path} is damaged (its checksum does not match its content)")
    try:
        t = Trace(collector=body["collector"], command=list(body["command"]), root=int(body["root"]),
                  nodes=[tuple(n) for n in body["nodes"]], node_proc=[int(x) for x in body["node_proc"]],
                  events=[(float(a), int(b), str(c), int(d)) for a, b, c, d in body["events"]],
                  procs={int(k): (int(v[0]), str(v[1])) for k, v in body["procs"].items()},
                  windows=list(body["windows"]), meta=dict(body["meta"]))
    except (KeyError, TypeError, ValueError):
        raise RepnetError(f"trace {path} is damaged (its fields do not have the trace layout)") from None
    n = len(t.nodes)
    if any(not (0 <= s < n and 0 <= d < n) or e not in EDGE_KINDS for _, s, e, d in t.events):
        raise RepnetError(f"trace {path} is damaged (an event names a node or edge type it does not have)")
    return t


# ----------------------------------------------------------------------------- building a trace
class TraceBuilder:
    """Turns per-process observations into a :class:`Trace`'s nodes and events (both collectors)."""

    def __init__(self, collector: str, command: list[str], aliases: list[tuple[str, str]]):
        self.trace = Trace(collector=collector, command=list(command))
        self.aliases = [tuple(a) for a in aliases]
        self.index: dict[str, int] = {}
        self.current: dict[int, int] = {}  # tgid -> its current process node
        self.active: dict[int, bool] = {}  # tgid -> whether its current node did anything yet
        self.exe: dict[int, str] = {}
        self.last: dict[tuple[int, str, int], float] = {}

    def node(self, nid: str, kind: str, label: str, tgid: int = -1) -> int:
        i = self.index.get(nid)
        if i is None:
            i = self.index[nid] = len(self.trace.nodes)
            self.trace.nodes.append((nid, kind, label))
            self.trace.node_proc.append(tgid)
        return i

    def proc_node(self, tgid: int) -> int:
        if tgid not in self.current:
            exe = self.exe.get(tgid, "?")
            self.current[tgid] = self.node(f"p:{tgid}:0", "p", exe, tgid)
            self.active[tgid] = False
            self.trace.procs.setdefault(tgid, (-1, exe))
            if self.trace.root < 0:
                self.trace.root = tgid
        return self.current[tgid]

    def edge(self, t: float, src: int, etype: str, dst: int, actor: int | None = None) -> None:
        key = (src, etype, dst)
        if key in self.last:  # one edge per (source, type, destination): its first time
            return
        self.last[key] = t
        self.trace.events.append((t, src, etype, dst))
        if actor is not None:
            self.active[actor] = True

    # observations
    def spawn(self, t: float, parent: int, child: int) -> None:
        pnode = self.proc_node(parent)
        self.exe[child] = self.exe.get(parent, "?")
        self.trace.procs[child] = (parent, self.exe[child])
        self.current.pop(child, None)
        cnode = self.proc_node(child)
        self.edge(t, pnode, "PROC_CREATE", cnode, parent)
        self.trace.procs[child] = (parent, self.exe[child])

    def execve(self, t: float, tgid: int, exe_path: str) -> None:
        label = normalise_path(exe_path, self.aliases)
        old = self.proc_node(tgid)
        if not self.active[tgid]:  # fork + exec: the child is what it runs
            nid, kind, _ = self.trace.nodes[old]
            self.trace.nodes[old] = (nid, kind, label)
            new = old
        else:
            gen = int(self.trace.nodes[old][0].rsplit(":", 1)[1]) + 1
            new = self.node(f"p:{tgid}:{gen}", "p", label, tgid)
            self.edge(t, old, "PROC_EXEC", new, tgid)
            self.current[tgid] = new
        self.exe[tgid] = label
        parent, _ = self.trace.procs.get(tgid, (-1, label))
        if self.trace.procs.get(tgid, (-1, "?"))[1] in ("?", ""):
            self.trace.procs[tgid] = (parent, label)
        f = self.node(f"f:{label}", "f", label)
        self.edge(t, f, "FILE_EXEC", new, tgid)

    def file(self, t: float, tgid: int, path: str, etype: str) -> None:
        if skip_path(path):
            return
        label = normalise_path(path, self.aliases)
        p = self.proc_node(tgid)
        f = self.node(f"f:{label}", "f", label)
        if etype == "READ":
            self.edge(t, f, "READ", p, tgid)
        else:
            self.edge(t, p, etype, f, tgid)

    def sock(self, t: float, tgid: int, label: str, etype: str) -> None:
        p = self.proc_node(tgid)
        s = self.node(f"s:{label}", "s", label)
        if etype in ("ACCEPT", "RECV"):
            self.edge(t, s, etype, p, tgid)
        else:
            self.edge(t, p, etype, s, tgid)

    def finish(self, windows: list[dict] | None = None, meta: dict | None = None) -> Trace:
        tr = self.trace
        for tgid, (parent, exe) in list(tr.procs.items()):
            tr.procs[tgid] = (parent, self.exe.get(tgid, exe) if exe == "?" else exe)
        tr.events.sort(key=lambda e: e[0])
        tr.windows = list(windows or [])
        tr.meta = dict(meta or {})
        return tr


def skip_path(path: str) -> bool:
    """Pipes, sockets seen as files, ttys, /dev character devices and anonymous inodes are not nodes."""
    return (not path or path.startswith(("pipe:", "anon_inode:", "socket:", "/dev/", "TCP", "UDP", "UNIX", "NETLINK"))
            or path in ("/", "?"))


# ----------------------------------------------------------------------------- strace
_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_FD = re.compile(r"^(-?\d+)<(.*)>(?:\(deleted\))?$")
_INET = re.compile(r'sin6?_port=htons\((\d+)\).*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
_UNIX = re.compile(r'sun_path=@?"([^"]*)"')
_CONN = re.compile(r"^(TCP|UDP|TCPv6|UDPv6):\[(.*?)(?:->(.*))?\]$")


def _fd_annotation(arg: str) -> tuple[int, str] | None:
    """``3</etc/passwd>`` -> (3, '/etc/passwd'); ``/dev/null<char 1:3>`` annotations lose the device part."""
    m = _FD.match(arg.strip())
    if not m:
        return None
    target = m.group(2)
    if target.endswith(">") and "<char " in target or "<block " in target:
        target = target.split("<", 1)[0]
    if target.endswith("(deleted)"):
        target = target[: -len("(deleted)")].rstrip()
    return int(m.group(1)), target


def _split_args(s: str) -> list[str]:
    """Top-level comma-separated arguments of ``name(...)`` text (quotes, brackets, <...> respected)."""
    out, depth, cur, quote, esc = [], 0, [], False, False
    prev = ""
    for ch in s:
        arrow = ch == ">" and prev == "-"  # 'a:1->b:2' inside a socket's <...>
        prev = ch
        if quote:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                quote = False
            continue
        if ch == '"':
            quote = True
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>" and not arrow:
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return out


def _unquote(s: str) -> str:
    s = s.strip()
    if s.startswith('"'):
        s = s[1:]
        end = s.rfind('"')
        s = s[:end] if end >= 0 else s
        return s.encode("latin1", "backslashreplace").decode("unicode_escape", "replace")
    return s


class StraceParser:
    """Incremental parser of ``strace -f -ttt -yy`` output into a :class:`TraceBuilder`.

    ``feed(line)`` per line; lines of a process whose creator's ``clone`` has not returned yet
    are held back and replayed once it does (strace shows a child's first system calls before
    the parent's ``clone`` returns), so threads are folded into their process."""

    def __init__(self, builder: TraceBuilder, root: int | None = None):
        self.b = builder
        self.pending: dict[int, tuple[str, float]] = {}  # pid -> the start of an unfinished call, its time
        self.tgid: dict[int, int] = {}
        self.held: dict[int, list[tuple[float, str]]] = {}
        self.root = root
        self.lines = 0
        self.exited: set[int] = set()  # processes (thread-group leaders) that exited

    def feed(self, line: str) -> None:
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            return
        self.lines += 1
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.startswith("+++"):
            if ("exited with" in rest or "killed by" in rest) and self.tgid.get(pid, pid) == pid:
                self.exited.add(pid)
            return
        if rest.startswith("---"):
            return
        if rest.endswith("<unfinished ...>"):
            self.pending[pid] = (rest[: -len("<unfinished ...>")].rstrip(), t)
            return
        if rest.startswith("<..."):
            head = self.pending.pop(pid, None)
            if head is None:
                return
            rest = head[0] + rest.split("resumed>", 1)[1] if "resumed>" in rest else head[0]
            t = head[1]  # a call happens when it starts (a clone before the child's first call)
        if self.root is None:
            self.root = pid
            self.tgid[pid] = pid
        if pid not in self.tgid:
            self.held.setdefault(pid, []).append((t, rest))
            return
        self.call(pid, t, rest)

    def call(self, pid: int, t: float, text: str) -> None:
        tg = self.tgid[pid]
        b = self.b
        b.proc_node(tg)
        name, _, tail = text.partition("(")
        if " = " not in tail:
            return
        args_s, ret = tail.rsplit(" = ", 1)
        args_s = args_s[:-1] if args_s.endswith(")") else args_s
        ret = ret.strip()
        if ret.startswith("-1") or ret.startswith("?"):
            if not (name == "connect" and "EINPROGRESS" in ret):
                return
        args = _split_args(args_s)
        if name in ("clone", "clone3", "fork", "vfork"):
            try:
                child = int(ret.split()[0])
            except ValueError:
                return
            if child <= 0:
                return
            if "CLONE_THREAD" in args_s:
                self.tgid[child] = tg
            else:
                self.tgid[child] = child
                b.spawn(t, tg, child)
            for ht, htext in self.held.pop(child, []):
                self.call(child, ht, htext)
            return
        if name == "execve" and args:
            path = _unquote(args[0])
            b.execve(t, tg, self._proc_fd(tg, path))
        elif name == "execveat" and len(args) >= 2:
            a = _fd_annotation(args[0])
            path = _unquote(args[1])
            b.execve(t, tg, a[1] if a and not path else path)
        elif name in ("open", "openat", "creat"):
            a = _fd_annotation(ret)
            if a is None:
                return
            flags = args[2] if name == "openat" and len(args) > 2 else (args[1] if len(args) > 1 else "")
            write = name == "creat" or any(f in flags for f in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"))
            b.file(t, tg, a[1], "WRITE" if write else "READ")
        elif name == "memfd_create":
            a = _fd_annotation(ret)
            if a is not None:
                b.file(t, tg, a[1], "WRITE")
        elif name in ("read", "pread64", "readv", "recvfrom", "recvmsg", "write", "pwrite64", "writev", "sendto",
                      "sendmsg", "connect", "accept", "accept4"):
            a = _fd_annotation(args[0]) if args else None
            if name in ("accept", "accept4"):
                r = _fd_annotation(ret)
                a = r or a
            if a is None:
                return
            target = a[1]
            incoming = name in ("read", "pread64", "readv", "recvfrom", "recvmsg")
            conn = _CONN.match(target)
            if conn or target.startswith("UNIX") or name in ("connect", "accept", "accept4"):
                label = self._sock_label(target, args_s if name == "connect" else "")
                if label is None:
                    return
                etype = {"connect": "CONNECT", "accept": "ACCEPT", "accept4": "ACCEPT"}.get(
                    name, "RECV" if incoming else "SEND")
                b.sock(t, tg, label, etype)
            else:
                b.file(t, tg, target, "READ" if incoming else "WRITE")
        elif name in ("rename", "renameat", "renameat2"):
            new = [x for x in args if x.startswith('"')]
            if len(new) >= 2:
                b.file(t, tg, self._abs(new[1], args), "WRITE")
        elif name in ("unlink", "unlinkat"):
            new = [x for x in args if x.startswith('"')]
            if new:
                b.file(t, tg, self._abs(new[0], args), "UNLINK")

    def _abs(self, quoted: str, args: list[str]) -> str:
        path = _unquote(quoted)
        if not path.startswith("/"):
            a = _fd_annotation(args[0]) if args else None
            if a is not None and a[1].startswith("/"):
                return a[1].rstrip("/") + "/" + path
        return path

    def _proc_fd(self, tg: int, path: str) -> str:
        """``/proc/self/fd/N`` (fexecve) -> what that descriptor is, from the memfd the process made."""
        m = re.match(r"^/proc/(?:self|\d+)/fd/(\d+)$", path)
        if m:
            for nid, kind, label in reversed(self.b.trace.nodes):
                if kind == "f" and label.startswith("/memfd:"):
                    return label
        return path

    def _sock_label(self, target: str, connect_args: str) -> str | None:
        al = self.b.aliases
        m = _INET.search(connect_args) if connect_args else None
        if m:
            addr = m.group(2) or m.group(3)
            return socket_label("tcp", None, f"{addr}:{m.group(1)}", al)
        um = _UNIX.search(connect_args) if connect_args else None
        if um:
            return "unix:" + (normalise_path(um.group(1), al) or "anon")
        conn = _CONN.match(target)
        if conn:
            proto = conn.group(1).lower().rstrip("v6")
            local, remote = conn.group(2), conn.group(3)
            if local and local.isdigit():  # only an inode: not connected yet
                return None
            return socket_label(proto, local, remote, al)
        if target.startswith("UNIX"):
            path = target.split('"')[1] if '"' in target else ""
            return "unix:" + (normalise_path(path, al) if path else "anon")
        return None

    def close(self) -> None:
        for pid, items in list(self.held.items()):  # processes whose creator was never seen: their own roots
            self.tgid[pid] = pid
            for ht, htext in items:
                self.call(pid, ht, htext)
        self.held.clear()


def parse_strace(lines, command: list[str] | None = None, aliases=(), windows=None, meta=None) -> Trace:
    """A :class:`Trace` from ``strace -f -ttt -yy`` output lines."""
    b = TraceBuilder("strace", command or [], list(aliases))
    p = StraceParser(b)
    for line in lines:
        p.feed(line)
    p.close()
    return b.finish(windows, meta)


# ----------------------------------------------------------------------------- collectors
class Collector:
    """One way of collecting a trace: ``available()`` (None, or why not), ``run(cmd)`` / ``attach(pid)``."""

    name = "?"

    def available(self) -> str | None:
        raise NotImplementedError

    def check(self) -> None:
        why = self.available()
        if why:
            raise RepnetError(f"collector {self.name} is not usable here: {why}")

    def run(self, command: list[str], *, aliases=(), windows_from=None, env=None, cwd=None,
            timeout: float | None = None, raw_out: str | None = None, output=None) -> Trace:
        raise NotImplementedError


class StraceCollector(Collector):
    """``strace -f -ttt -yy -qq`` of a command (or ``attach(pid)``); the trace's windows can come
    from a manifest file the command writes (``windows_from``: one JSON object per line with
    ``root`` (a pid), ``label`` and ``name``)."""

    name = "strace"

    def available(self) -> str | None:
        if shutil.which("strace") is None:
            return "strace is not installed (Debian: apt-get install strace)"
        return None

    def _argv(self, raw: str) -> list[str]:
        return ["strace", "-f", "-ttt", "-qq", "-yy", "-s", "0", "-e", f"trace={STRACE_SYSCALLS}",
                "-e", "signal=none", "-o", raw]

    def run(self, command, *, aliases=(), windows_from=None, env=None, cwd=None, timeout=None, raw_out=None,
            output=None):
        self.check()
        if not command:
            raise RepnetError("collect: no command given (repnet proviot collect -- CMD ...)")
        with tempfile.TemporaryDirectory(prefix="proviot-") as tmp:
            raw = raw_out or os.path.join(tmp, "strace.txt")
            t0 = time.time()
            try:
                r = subprocess.run(self._argv(raw) + ["--", *command], env=env, cwd=cwd, timeout=timeout,
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=output)
            except subprocess.TimeoutExpired:
                raise RepnetError(f"collect: {command[0]} ran past {timeout} s") from None
            wall = time.time() - t0
            text = Path(raw).read_text(errors="replace") if os.path.exists(raw) else ""
            if not text.strip():
                raise RepnetError(f"collect: strace saw nothing of {command[0]} (exit {r.returncode}); is "
                                  "ptrace allowed here?")
            windows = read_manifest(windows_from) if windows_from else None
            return parse_strace(text.splitlines(), list(command), aliases, windows,
                                {"wall_s": wall, "exit_status": r.returncode, "started": t0,
                                 "raw_lines": text.count("\n")})

    def attach(self, pid: int, seconds: float, *, aliases=()) -> Trace:
        """Trace a running process (and what it starts) for ``seconds``."""
        self.check()
        if not os.path.exists(f"/proc/{pid}"):
            raise RepnetError(f"collect: no process {pid}")
        with tempfile.TemporaryDirectory(prefix="proviot-") as tmp:
            raw = os.path.join(tmp, "strace.txt")
            argv = self._argv(raw)
            p = subprocess.Popen(argv + ["-p", str(pid)], stdin=subprocess.DEVNULL)
            time.sleep(seconds)
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)
            text = Path(raw).read_text(errors="replace") if os.path.exists(raw) else ""
            return parse_strace(text.splitlines(), [f"pid:{pid}"], aliases, None, {"wall_s": seconds})


def read_manifest(path) -> list[dict]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            rec = json.loads(line)
            out.append({"root": int(rec["root"]), "label": str(rec["label"]), "name": str(rec.get("name", ""))})
    return out


# ----------------------------------------------------------------------------- auditd
AUDIT_SYSCALLS = ("execve", "execveat", "clone", "clone3", "fork", "vfork", "openat", "open", "creat", "connect",
                  "accept", "accept4", "memfd_create", "renameat2", "rename", "unlinkat", "unlink")
_AUDIT_REC = re.compile(r"type=(\w+) msg=audit\((\d+\.\d+):(\d+)\): (.*)")
_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_SYSCALL_NR_X86_64 = {59: "execve", 322: "execveat", 56: "clone", 435: "clone3", 57: "fork", 58: "vfork",
                      257: "openat", 2: "open", 85: "creat", 42: "connect", 43: "accept", 288: "accept4",
                      319: "memfd_create", 316: "renameat2", 82: "rename", 263: "unlinkat", 87: "unlink"}


class AuditdCollector(Collector):
    """The kernel audit subsystem: ``auditd`` in the foreground writing its log to a file of ours,
    one rule set confined to the traced tree by a fresh login uid (``auid``) that the command's
    process takes before it runs (children inherit it), removed afterwards.

    Where auditing is under someone else's control (an ``auditd`` already running, a container
    without ``CAP_AUDIT_CONTROL``), :meth:`available` says so and nothing is changed."""

    name = "auditd"

    def available(self) -> str | None:
        for tool in ("auditd", "auditctl"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (Debian: apt-get install auditd)"
        if os.geteuid() != 0:
            return "auditing needs root"
        r = subprocess.run(["auditctl", "-s"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"auditctl -s failed ({(r.stderr or r.stdout).strip().splitlines()[0] if (r.stderr or r.stdout).strip() else r.returncode}): the kernel does not let this machine control auditing"
        pid = re.search(r"^pid (\d+)", r.stdout, re.M)
        if pid and int(pid.group(1)) != 0:
            return f"an audit daemon (pid {pid.group(1)}) already owns the audit log"
        return None

    def run(self, command, *, aliases=(), windows_from=None, env=None, cwd=None, timeout=None, raw_out=None,
            output=None):
        self.check()
        if not command:
            raise RepnetError("collect: no command given (repnet proviot collect -- CMD ...)")
        auid = 4_000_000_000 - (os.getpid() % 100_000)
        key = f"repnet-proviot-{os.getpid()}"
        with tempfile.TemporaryDirectory(prefix="proviot-audit-") as tmp:
            log = raw_out or os.path.join(tmp, "audit.log")
            conf = os.path.join(tmp, "auditd.conf")
            Path(conf).write_text(f"log_file = {log}\nlog_format = RAW\nflush = INCREMENTAL_ASYNC\nfreq = 50\n"
                                  "write_logs = yes\nmax_log_file = 1024\nmax_log_file_action = IGNORE\n"
                                  "space_left = 2\nadmin_space_left = 1\ndisk_full_action = IGNORE\n"
                                  "disk_error_action = IGNORE\nnum_logs = 1\n")
            os.chmod(conf, 0o640)
            status = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
            was_enabled = re.search(r"^enabled (\d)", status, re.M)
            daemon = subprocess.Popen(["auditd", "-n", "-c", tmp], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
            rule = ["-a", "always,exit", "-F", "arch=b64", "-S", ",".join(AUDIT_SYSCALLS), "-F", f"auid={auid}",
                    "-F", f"key={key}"]
            try:
                deadline = time.time() + 10
                while not os.path.exists(log) and time.time() < deadline and daemon.poll() is None:
                    time.sleep(0.05)
                if daemon.poll() is not None:
                    raise RepnetError("collect: auditd did not start: "
                                      + (daemon.stderr.read().decode(errors="replace").strip()[-300:] or "no reason"))
                subprocess.run(["auditctl", "-e", "1"], capture_output=True, check=True)
                subprocess.run(["auditctl", *rule], capture_output=True, check=True)

                def take_auid():
                    with open("/proc/self/loginuid", "w") as f:
                        f.write(str(auid))

                t0 = time.time()
                try:
                    p = subprocess.run(list(command), env=env, cwd=cwd, timeout=timeout, preexec_fn=take_auid,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=output)
                except subprocess.TimeoutExpired:
                    raise RepnetError(f"collect: {command[0]} ran past {timeout} s") from None
                wall = time.time() - t0
                time.sleep(0.3)
            finally:
                subprocess.run(["auditctl", "-d", *rule[1:]], capture_output=True)
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
                if was_enabled and was_enabled.group(1) == "0":
                    subprocess.run(["auditctl", "-e", "0"], capture_output=True)
            text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
            windows = read_manifest(windows_from) if windows_from else None
            return parse_audit(text.splitlines(), list(command), key, aliases, windows,
                               {"wall_s": wall, "exit_status": p.returncode, "started": t0})


def parse_audit(lines, command, key: str, aliases=(), windows=None, meta=None) -> Trace:
    """A :class:`Trace` from raw audit log lines (records grouped by event serial, ``key`` ours)."""
    events: dict[str, list[tuple[str, dict, str]]] = {}
    order: list[str] = []
    for line in lines:
        m = _AUDIT_REC.match(line)
        if not m:
            continue
        typ, ts, serial, rest = m.groups()
        if serial not in events:
            events[serial] = []
            order.append(serial)
        kv = {k: v for k, v in _KV.findall(rest)}
        events[serial].append((typ, kv, ts))
    b = TraceBuilder("auditd", command, list(aliases))
    fds: dict[int, dict[int, str]] = {}
    seen_root = None
    for serial in order:
        recs = events[serial]
        sc = next((kv for typ, kv, _ in recs if typ == "SYSCALL"), None)
        if sc is None or sc.get("key", "").strip('"') != key:
            continue
        t = float(recs[0][2])
        pid, ppid = int(sc["pid"]), int(sc["ppid"])
        if seen_root is None:
            seen_root = pid
            b.exe[pid] = _audit_str(sc.get("exe", '"?"'))
        name = _SYSCALL_NR_X86_64.get(int(sc.get("syscall", -1)), "")
        ok = sc.get("success") == "yes"
        if not ok and name != "connect":
            continue
        paths = [kv for typ, kv, _ in recs if typ == "PATH"]
        cwd = next((_audit_str(kv.get("cwd", '""')) for typ, kv, _ in recs if typ == "CWD"), "")
        if pid not in b.current and ppid in b.current and name not in ("clone", "clone3", "fork", "vfork"):
            b.spawn(t, ppid, pid)
        if name in ("clone", "clone3", "fork", "vfork"):
            child = int(sc.get("exit", "0"))
            if child > 0:
                b.proc_node(pid)
                b.spawn(t, pid, child)
        elif name in ("execve", "execveat"):
            exe = _audit_str(sc.get("exe", '"?"'))
            if name == "execveat" or exe.startswith("/memfd:"):
                exe = exe if exe.startswith("/memfd:") else exe
            b.execve(t, pid, exe)
        elif name in ("open", "openat", "creat", "memfd_create"):
            fd = int(sc.get("exit", "-1"))
            if name == "memfd_create":
                path = "/memfd:" + "?"
                fds.setdefault(pid, {})[fd] = path
                b.file(t, pid, path, "WRITE")
                continue
            items = [kv for kv in paths if kv.get("nametype") in ("NORMAL", "CREATE")]
            if not items:
                continue
            path = _audit_str(items[-1].get("name", '""'))
            if not path.startswith("/") and cwd:
                path = cwd.rstrip("/") + "/" + path
            flags = int(sc.get("a2" if name == "openat" else "a1", "0"), 16)
            write = name == "creat" or bool(flags & 0o3) or bool(flags & 0o1100)
            fds.setdefault(pid, {})[fd] = path
            b.file(t, pid, path, "WRITE" if write else "READ")
        elif name in ("connect", "accept", "accept4"):
            sa = next((kv for typ, kv, _ in recs if typ == "SOCKADDR"), None)
            if sa is None:
                continue
            label = _audit_sockaddr(sa.get("saddr", ""), b.aliases)
            if label is not None:
                b.sock(t, pid, label, "CONNECT" if name == "connect" else "ACCEPT")
        elif name in ("rename", "renameat2", "unlink", "unlinkat"):
            items = [kv for kv in paths if kv.get("nametype") in ("CREATE", "DELETE")]
            for kv in items:
                path = _audit_str(kv.get("name", '""'))
                if not path.startswith("/") and cwd:
                    path = cwd.rstrip("/") + "/" + path
                if kv.get("nametype") == "CREATE":
                    b.file(t, pid, path, "WRITE")
                elif name.startswith("unlink"):
                    b.file(t, pid, path, "UNLINK")
    return b.finish(windows, meta)


def _audit_str(v: str) -> str:
    if v.startswith('"'):
        return v[1:-1]
    try:
        return bytes.fromhex(v).decode(errors="replace")
    except ValueError:
        return v


def _audit_sockaddr(hexs: str, aliases) -> str | None:
    try:
        raw = bytes.fromhex(hexs)
    except ValueError:
        return None
    if len(raw) < 2:
        return None
    fam = int.from_bytes(raw[:2], "little")
    if fam == 2 and len(raw) >= 8:  # AF_INET
        port = int.from_bytes(raw[2:4], "big")
        addr = ".".join(str(x) for x in raw[4:8])
        return socket_label("tcp", None, f"{addr}:{port}", aliases)
    if fam == 1:  # AF_UNIX
        path = raw[2:].split(b"\0", 1)[0].decode(errors="replace")
        return "unix:" + (normalise_path(path, aliases) if path else "anon")
    return None


COLLECTORS = {"strace": StraceCollector, "auditd": AuditdCollector}


def collector(name: str) -> Collector:
    """The collector called ``name`` (``strace`` or ``auditd``)."""
    if name not in COLLECTORS:
        raise RepnetError(f"unknown collector '{name}'; choose from: {', '.join(COLLECTORS)}")
    return COLLECTORS[name]()
