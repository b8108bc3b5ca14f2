"""Everything repnet writes to disk or reads back from a user: one place, one set of rules.

* **One atomic writer** (:func:`atomic_write`): a temporary file in the target's folder, flushed, then
  one ``os.replace``; a kill, a full disk or an exception leaves the old file as it was.
* **Checkpoints** are read with ``weights_only=True`` and carry a SHA-256 of their content
  (:func:`content_digest`), checked on load; safetensors files carry it in their metadata.
* **Pickled datasets** (CIFAR) go through :class:`RestrictedUnpickler`: nothing that can call code.
* **Run folders** record their kind and state (:class:`RunKind`, :func:`claim_folder`).
* Every failure to read is a :class:`~repnet.errors.RepnetError` with one line.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import pickle
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from repnet.errors import NonFinite, RepnetError

TMP_PREFIX = ".tmp-"
DIGEST_KEY = "__sha256__"


# ----------------------------------------------------------------------------- output paths
#: What an output path names: ``file`` (its folder must exist), ``folder`` (its parent must exist) or
#: ``run`` (a run folder: it and its missing parents are created, as ``runs/<name>`` on a fresh checkout).
OUTPUT_KINDS = ("file", "folder", "run")


def probe_writable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (None: it can). It creates and removes a temporary
    file there, the only test that tells the truth for root (``os.access`` says yes to root for a
    0o500 folder, and to every user for ``/proc``, where nothing can be created)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + "probe-")
    except OSError as e:  # (/proc answers ENOENT for a folder that exists)
        return "no file can be created there" if e.errno == errno.ENOENT and folder.is_dir() else e.strerror or str(e)
    os.close(fd)
    os.unlink(tmp)
    return None


def check_output(path: str | os.PathLike, kind: str = "file", what: str = "output") -> Path:
    """Refuse, in one line and before any work, an output path repnet could not write.

    ``kind`` (:data:`OUTPUT_KINDS`): a ``file`` must not be a folder or a device / pipe, and its folder
    must exist and be writable; a ``folder`` must not be a file, and its parent must exist and be
    writable (it may exist: the command decides what may be in it); a ``run`` folder likewise, except
    that missing parents are fine (they are created) as long as the nearest existing one is a
    writable folder. Nothing is written (a probe file is created and removed: :func:`probe_writable`).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    text = os.fspath(path)
    if not str(text).strip():
        raise RepnetError(f"{what}: an empty path")
    p = Path(text)
    label = f"{what} {text}"
    if p.exists():
        if kind == "file":
            if p.is_dir():
                raise RepnetError(f"{label} is a folder: give a file name")
            if not stat.S_ISREG(p.stat().st_mode):
                raise RepnetError(f"{label} is not a regular file (a device, pipe or socket): it is never replaced")
        elif not p.is_dir():
            raise RepnetError(f"{label} is a file, not a folder")
    parent = p.parent if p.parent != Path("") else Path(".")
    if kind == "run" or (kind == "folder" and p.is_dir()):
        target = p if p.is_dir() else None
        if target is None:  # the nearest existing ancestor receives the new folders
            target = parent
            while not target.exists() and target != target.parent:
                target = target.parent
    else:
        target = parent
        if not target.exists():
            above = next((a for a in target.parents if a.exists()), None)
            if above is not None and not above.is_dir():
                raise RepnetError(f"{label}: {above} is a file, not a folder")
            raise RepnetError(f"{label}: folder {target} does not exist (create it first)")
    if not target.is_dir():
        raise RepnetError(f"{label}: {target} is a file, not a folder")
    why = probe_writable(target)
    if why is not None:
        raise RepnetError(f"{label}: cannot write in {target} ({why})")
    return p


# ----------------------------------------------------------------------------- writing
def disk_full(folder: str | os.PathLike) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left (less than 64 KiB)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # (read once: os.umask can only be read by setting it)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move ``tmp_path`` onto ``path`` atomically (same folder, fsynced).

    An OS error (missing parent, read-only folder, full disk) is one :class:`RepnetError`; the
    previous ``path``, if any, is untouched and no temporary file is left.
    """
    path = Path(path)
    if path.is_dir():
        raise RepnetError(f"cannot write {path}: it is a folder")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise RepnetError(f"cannot write {path}: it is not a regular file (a device, pipe or socket)")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix="-" + path.name)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0o600 files; a result has the user's usual mode
        os.close(fd)
    except OSError as e:
        raise RepnetError(f"cannot write {path}: {e.strerror or e}") from None
    kept = " (the previous file is kept)" if path.exists() else ""
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RepnetError(f"cannot write {path}: {e.strerror or e}{kept}") from None
    except (RuntimeError, ValueError):  # a library's own writer (torch, matplotlib) on a full disk
        if not disk_full(path.parent):
            raise
        raise RepnetError(f"cannot write {path}: no space left on device{kept}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_append_text(path: str | os.PathLike, text: str) -> None:
    """``path``'s text with ``text`` added at its end, written atomically (for small logs)."""
    path = Path(path)
    old = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, old + text.encode("utf-8"))


#: The file that names a run folder's kind and state (written first, before any work).
RUN_FILE = "repnet-run.json"


@dataclass(frozen=True)
class RunKind:
    """What a workflow's run folder holds: ``marker`` (the file that says the run got somewhere, e.g.
    its checkpoint), ``files`` (glob patterns of everything it writes) and ``verify(folder)`` (raises
    ``RepnetError`` unless the marker is really ours; used for folders written before
    :data:`RUN_FILE` existed). ``command`` names the workflow in messages; ``early``: what it writes
    between its claim and its marker (:func:`release_claim`)."""

    name: str
    marker: str
    files: tuple[str, ...]
    verify: Callable[[Path], Any]
    command: str = "repnet"
    early: tuple[str, ...] = ()  # files written after the claim and before the marker (e.g. config.yaml)


def read_run_file(folder: str | os.PathLike) -> dict | None:
    """The kind and state recorded in ``folder/repnet-run.json`` (None: no such file); one line if damaged."""
    path = Path(folder) / RUN_FILE
    if not os.path.lexists(path):
        return None
    try:
        rec = read_json(path, "run record", max_bytes=1 << 16)
    except RepnetError:
        rec = None
    if not (isinstance(rec, dict) and isinstance(rec.get("kind"), str) and isinstance(rec.get("state"), str)):
        raise RepnetError(f"{path} is damaged (not a repnet run record): the folder is left as it is; give another "
                          "folder")
    return rec


def set_run_state(folder: str | os.PathLike, kind: RunKind, state: str) -> None:
    """Record ``folder``'s kind and ``state`` (``started`` / ``finished``) in :data:`RUN_FILE`, atomically."""
    import json

    atomic_write_text(Path(folder) / RUN_FILE, json.dumps({"kind": kind.name, "state": state}) + "\n")


def claim_folder(folder: str | os.PathLike, what: str = "--out", kind: RunKind | None = None,
                 overwrite: bool = False) -> Path:
    """Create ``folder`` for a new run, or accept it if it is empty; anything else is one line.

    A run folder is ours only: one with the user's own files is refused before anything is
    written into it, so nothing the user owned is ever replaced. Its kind and state are recorded in
    :data:`RUN_FILE` as soon as it is claimed. A folder holding an earlier run of ``kind`` is refused
    with the way out (``--resume`` / ``--overwrite``); with ``overwrite`` its files are removed and
    the folder reused - only when the run is of the same kind and the folder holds nothing but that
    run's files. A run of another kind is never replaced.
    """
    import fnmatch
    import shutil

    folder = check_output(folder, "run", what)
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise RepnetError(f"cannot create {what} {folder}: {e.strerror or e}") from None
        if kind is not None:
            set_run_state(folder, kind, "started")
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)]
    ours: list[Path] = []
    record = read_run_file(folder) if kind is not None else None
    if record is not None and record["kind"] != kind.name:
        raise RepnetError(f"{what} {folder} holds a {record['kind']}, not a {kind.name}: it is never replaced by "
                          f"{kind.command}; pick another {what}")
    if kind is not None and (record is not None or (folder / kind.marker).exists()):
        started_only = not (folder / kind.marker).exists()  # killed before its first checkpoint
        if not overwrite:
            if started_only:
                raise RepnetError(f"{folder} holds a {kind.name} stopped before its first checkpoint: start it again "
                                  f"with the same command and --overwrite, or pick another {what}")
            raise RepnetError(f"{folder} already holds a {kind.name}; continue it with --resume, replace it with "
                              f"--overwrite, or pick another {what}")
        if record is None:  # a run folder written before repnet-run.json existed: its marker must be ours
            kind.verify(folder)
        ours = [p for p in entries if p.name == RUN_FILE or any(fnmatch.fnmatch(p.name, pat) for pat in kind.files)]
    foreign = sorted(p.name for p in entries if p not in ours)
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise RepnetError(f"{what} {folder} is not empty ({', '.join(foreign[:3])}{more}"
                          f"{' besides its earlier run' if ours else ''}): give a new or empty folder, or resume "
                          "the run it holds")
    for p in ours:  # only with overwrite: the files of an earlier run of the same kind
        if p.name != RUN_FILE:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    clean_temps(folder)
    if kind is not None:
        set_run_state(folder, kind, "started")
    return folder


def missing_root(folder: str | os.PathLike) -> Path | None:
    """The topmost of ``folder`` and its parents that does not exist yet (what creating it creates), or None."""
    folder, top = Path(os.path.abspath(folder)), None
    while not folder.exists() and folder != folder.parent:
        top, folder = folder, folder.parent
    return top


def release_claim(folder: str | os.PathLike, kind: RunKind, created: Path | None = None,
                  untrained_marker: bool = False) -> bool:
    """Undo :func:`claim_folder` for a run refused (bad input found while building it) before its marker:
    remove :data:`RUN_FILE` and the kind's ``early`` files, and the folders the claim created (``created``:
    :func:`missing_root` before the claim), so the same command works again once the input is fixed. A folder
    holding anything else (a run's other files; the marker, unless the caller knows it records no progress:
    ``untrained_marker``) is left as it is. Whether it was released."""
    import shutil

    folder = Path(folder)
    early = set(kind.early) | ({kind.marker} if untrained_marker else set())
    if not folder.is_dir() or ((folder / kind.marker).exists() and not untrained_marker):
        return False
    try:
        record = read_run_file(folder)
    except RepnetError:
        return False
    entries = list(folder.iterdir())
    if record is None or record["kind"] != kind.name or any(
            p.name != RUN_FILE and p.name not in early and not p.name.startswith(TMP_PREFIX) for p in entries):
        return False
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if created is not None:
        d = Path(os.path.abspath(folder))
        while d != d.parent:
            try:
                d.rmdir()
            except OSError:
                break
            if d == Path(created):
                break
            d = d.parent
    return True


def check_resumable(folder: str | os.PathLike, kind: RunKind) -> Path:
    """``folder`` holds a run of ``kind`` that can be continued (its marker exists); else one line
    naming the command that works."""
    folder = Path(folder)
    record = read_run_file(folder) if folder.is_dir() else None
    if record is not None and record["kind"] != kind.name:
        raise RepnetError(f"cannot resume {folder}: it holds a {record['kind']}, not a {kind.name}")
    if not (folder / kind.marker).is_file():
        if record is not None:
            raise RepnetError(f"cannot resume {folder}: the {kind.name} was stopped before its first checkpoint; start "
                              "it again with the same command and --overwrite (instead of --resume)")
        raise RepnetError(f"cannot resume: no {kind.marker} in {folder}")
    return folder


def clean_temps(folder: str | os.PathLike) -> int:
    """Remove temporary files an interrupted :func:`atomic_write` left in ``folder``; how many."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TMP_PREFIX + "*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def truncate_log(path: str | os.PathLike, epochs_done: int) -> None:
    """Drop the records of a run's ``log.jsonl`` (one JSON object per line, with its ``epoch``) for epochs
    a resumed run will redo; a line torn by a kill mid-write is dropped too."""
    import json

    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write: dropped
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= epochs_done:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- checkpoints
def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes; other values by repr."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"V{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def non_finite(obj: Any, where: str = "") -> str | None:
    """The key path of the first floating tensor in ``obj`` (nested dicts / lists) holding a NaN or an
    infinity, or None when every one is finite."""
    if isinstance(obj, torch.Tensor):
        return None if not obj.is_floating_point() or bool(torch.isfinite(obj).all()) else (where or "tensor")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = non_finite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


def check_finite(obj: Any, what: str) -> None:
    """Raise :class:`~repnet.errors.NonFinite` (one line) if a floating tensor in ``obj`` is not finite:
    no NaN or infinity is ever written as a result, a checkpoint or an export."""
    bad = non_finite(obj)
    if bad is not None:
        raise NonFinite(f"refusing to write {what}: {bad} holds non-finite values (NaN / inf; training diverged: "
                        "lower the learning rate); nothing was written")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` (a dict) atomically, with its content digest inside; refuses non-finite tensors.

    The file is serialised in memory first, so a full disk is one ``OSError`` from the atomic writer
    (one line, the previous checkpoint kept, no temporary file), never torch's two chained errors."""
    check_finite(obj, f"checkpoint {path}")
    payload = {**obj, DIGEST_KEY: content_digest(obj)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", verify: bool = True,
                    fields: dict | None = None) -> dict:
    """Read a file written by :func:`save_checkpoint`: weights only, digest checked, then its structure
    (``fields``: :func:`check_fields`, e.g. the keys of one kind of run's checkpoint); one-line errors."""
    obj = load_torch_file(path, what)
    if not isinstance(obj, dict):
        raise RepnetError(f"{what} {path} does not hold a repnet checkpoint")
    digest = obj.pop(DIGEST_KEY, None)
    try:
        actual = content_digest(obj) if verify else None
    except RecursionError:
        raise RepnetError(f"{what} {path} is nested too deeply to be a repnet checkpoint: damaged or crafted") from None
    if verify and (digest is None or digest != actual):
        raise RepnetError(f"{what} {path} is damaged (its checksum does not match its content)"
                          if digest is not None else f"{what} {path} carries no checksum: not written by repnet")
    if fields is not None:
        check_fields(obj, fields, f"{what} {path}")
    return obj


def load_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(..., weights_only=True)``, every failure as one line: torch's warnings are silenced
    and its advice to re-run with weights-only loading off is never passed on."""
    path = Path(path)
    if not path.is_file():
        raise RepnetError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 ..., please file an issue"
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise RepnetError(f"could not read {what} {path}: refused, it holds objects other than tensors and "
                              "plain values (a pickle that could run code)") from None
        raise RepnetError(f"could not read {what} {path}: damaged or not a PyTorch file ({_torch_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - zip / EOF / runtime errors from a damaged file come in many types
        raise RepnetError(f"could not read {what} {path}: damaged or not a PyTorch file "
                          f"({type(e).__name__}: {_torch_reason(e)})") from None


def _torch_reason(e: Exception) -> str:
    """The one line of a torch.load error that names the problem (never its advice on weights_only)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return (lines[0] if lines else type(e).__name__)[:200]


#: The largest JSON file :func:`read_json` reads (records, configs, results: kilobytes).
JSON_MAX_BYTES = 64 << 20


def read_json(path: str | os.PathLike, what: str = "file", max_bytes: int = JSON_MAX_BYTES) -> Any:
    """``json.load`` with one-line errors: missing, not a regular file (a device, a pipe), larger than
    ``max_bytes``, not UTF-8, not JSON, nested too deeply."""
    import json

    path = Path(path)
    if not os.path.lexists(path):
        raise RepnetError(f"{what} {path} not found")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RepnetError(f"{what} {path} is not a regular file")
        if st.st_size > max_bytes:
            raise RepnetError(f"{what} {path} is {st.st_size:,d} bytes: too large to be one ({max_bytes:,d} at most)")
        raw = path.read_bytes()
    except OSError as e:
        raise RepnetError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RepnetError(f"{what} {path} is not UTF-8 text (byte {e.start}): damaged or another kind of file") from None
    except RecursionError:
        raise RepnetError(f"{what} {path} is nested too deeply to be one: damaged or crafted") from None
    except ValueError as e:
        raise RepnetError(f"{what} {path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- structure of what is read
class Spec:
    """What one field of a file must be (:func:`check_fields`): ``types`` (``int`` excludes bools, ``float``
    takes ints and must be finite, ``None`` allows null), bounds ``low`` / ``high``, ``choices``, the nested
    ``fields`` of a mapping, the spec of each of its values (``values``) or of each item of a list (``items``),
    ``required`` (False: may be absent)."""

    def __init__(self, *types, low=None, high=None, choices=None, fields: dict | None = None, items=None,
                 values=None, required: bool = True):
        self.types = tuple(type(None) if t is None else t for t in types)
        self.low, self.high, self.choices = low, high, choices
        self.fields, self.items, self.values, self.required = fields, items, values, required


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true / false", dict: "a mapping",
               list: "a list", type(None): "null"}


def _problem(value: Any, spec: Any, where: str, depth: int = 0) -> str | None:
    if not isinstance(spec, Spec):
        spec = Spec(*spec) if isinstance(spec, tuple) else Spec(spec)
    if depth > 32:
        return f"{where} is nested too deeply"
    ok = False
    for t in spec.types:
        if t is type(None):
            ok = value is None
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, t)
        if ok:
            break
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in spec.types)
        shown = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        return f"{where} is {shown[:60]}, expected {want}"
    if value is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return f"{where} is {value!r}, expected one of {', '.join(map(str, spec.choices))}"
    if spec.low is not None and isinstance(value, (int, float)) and value < spec.low:
        return f"{where} is {value!r}, expected >= {spec.low}"
    if spec.high is not None and isinstance(value, (int, float)) and value > spec.high:
        return f"{where} is {value!r}, expected <= {spec.high:,}"
    if spec.fields is not None and isinstance(value, dict):
        for key, sub in spec.fields.items():
            if key not in value:
                if not isinstance(sub, Spec) or sub.required:
                    return f"{where}.{key} is missing" if where else f"{key} is missing"
                continue
            bad = _problem(value[key], sub, f"{where}.{key}" if where else key, depth + 1)
            if bad:
                return bad
    if spec.values is not None and isinstance(value, dict):
        for key, item in value.items():
            bad = _problem(item, spec.values, f"{where}.{key}" if where else str(key), depth + 1)
            if bad:
                return bad
    if spec.items is not None and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            bad = _problem(item, spec.items, f"{where}[{i}]", depth + 1)
            if bad:
                return bad
    return None


def check_fields(obj: Any, fields: dict, what: str) -> dict:
    """``obj`` must be a mapping whose keys match ``fields`` (key -> a type, a tuple of types or a
    :class:`Spec`; other keys are allowed); else one line ``{what} is malformed: <the first problem>``.
    Used after a checksum: a file can be intact and still not be what it claims (another kind of run's
    checkpoint, a hand-edited config)."""
    if not isinstance(obj, dict):
        raise RepnetError(f"{what} is malformed: it holds {type(obj).__name__}, not a mapping")
    bad = _problem(obj, Spec(dict, fields=fields), "")
    if bad:
        raise RepnetError(f"{what} is malformed: {bad}")
    return obj


# ----------------------------------------------------------------------------- safetensors
def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None, what: str = "tensors") -> bytes:
    """Safetensors bytes of ``tensors`` with their digest in the file's metadata; non-finite tensors are
    refused (:func:`check_finite`, ``what`` names them)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite(tensors, what)
    meta = {**(metadata or {}), DIGEST_KEY: content_digest(dict(sorted(tensors.items())))}
    return save(tensors, metadata=meta)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` as safetensors, atomically, with their digest in the file's metadata (never a
    non-finite tensor: :func:`check_finite`)."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata, what=str(path)))


def read_safetensors(path: str | os.PathLike, what: str = "file", require_digest: bool = False) -> dict:
    """Read a safetensors file (never code); check the digest :func:`save_tensors` put in it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RepnetError(f"{what} {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - header / size errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RepnetError(f"{what} {path} is damaged or not a safetensors file ({first[:200]})") from None
    digest = meta.get(DIGEST_KEY)
    if digest is None and require_digest:
        raise RepnetError(f"{what} {path} carries no checksum: not written by repnet")
    if digest is not None and digest != content_digest(dict(sorted(tensors.items()))):
        raise RepnetError(f"{what} {path} is damaged (its checksum does not match its tensors)")
    return tensors


# ----------------------------------------------------------------------------- restricted pickles
class Refused(pickle.UnpicklingError):
    """A pickle asked for something :class:`RestrictedUnpickler` does not admit."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, numbers and numpy arrays, and refuses everything else.

    Python's pickle can call any importable function while loading (``find_class`` + ``REDUCE``);
    this one resolves only the handful of globals that numpy arrays and dtypes are rebuilt with,
    so a crafted file fails before anything runs.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise Refused(f"global '{module}.{name}' is not allowed")


def _plain_dtype(*args):
    """``numpy.dtype`` without object dtypes (raw bytes read as object pointers could crash)."""
    import numpy as np

    dt = np.dtype(*args)
    if dt.hasobject:
        raise Refused("object arrays are not allowed")
    return dt


def restricted_unpickle(path: str | os.PathLike, what: str = "file", encoding: str = "latin1") -> Any:
    """Read a pickle of plain data (:class:`RestrictedUnpickler`); anything else is one line."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise RepnetError(f"{what} '{path}' is missing")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(io.BufferedReader(f), encoding=encoding).load()
    except Refused as e:
        raise RepnetError(f"{what} '{path}' refused: {e} (only plain data and numpy arrays are read)") from None
    except Exception as e:  # noqa: BLE001 - truncated / garbage files fail in many ways
        raise RepnetError(f"{what} '{path}' is corrupt or not a python pickle ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None

    def check(o: Any) -> None:
        if isinstance(o, np.ndarray) and o.dtype.hasobject:
            raise RepnetError(f"{what} '{path}' refused: it holds an object array")
        if isinstance(o, dict):
            for k, v in o.items():
                check(k)
                check(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                check(v)

    try:
        check(obj)
    except RecursionError:
        raise RepnetError(f"{what} '{path}' is nested too deeply: damaged or crafted") from None
    return obj
