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

import hashlib
import io
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from repnet.errors import RepnetError

TMP_PREFIX = ".tmp-"
DIGEST_KEY = "__sha256__"


# ----------------------------------------------------------------------------- writing
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move ``tmp_path`` onto ``path`` atomically (same folder, fsynced).

    An OS error (missing parent, read-only folder, full disk) is one :class:`RepnetError`; the
    previous ``path``, if any, is untouched.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix="-" + path.name)
        os.close(fd)
    except OSError as e:
        raise RepnetError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RepnetError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


#: The file that names a run folder's kind and state (written first, before any work).
RUN_FILE = "repnet-run.json"


@dataclass(frozen=True)
class RunKind:
    """What a workflow's run folder holds: ``marker`` (the file that says the run got somewhere, e.g.
    its checkpoint), ``files`` (glob patterns of everything it writes) and ``verify(folder)`` (raises
    ``RepnetError`` unless the marker is really ours; used for folders written before
    :data:`RUN_FILE` existed). ``command`` names the workflow in messages."""

    name: str
    marker: str
    files: tuple[str, ...]
    verify: Callable[[Path], Any]
    command: str = "repnet"


def read_run_file(folder: str | os.PathLike) -> dict | None:
    """The kind and state recorded in ``folder/repnet-run.json`` (None: no such file); one line if damaged."""
    import json

    path = Path(folder) / RUN_FILE
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
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

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RepnetError(f"{what} {folder} is a file, not a folder")
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


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` (a dict) atomically, with its content digest inside."""
    payload = {**obj, DIGEST_KEY: content_digest(obj)}
    atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", verify: bool = True) -> dict:
    """Read a file written by :func:`save_checkpoint`: weights only, digest checked, one-line errors."""
    obj = load_torch_file(path, what)
    if not isinstance(obj, dict):
        raise RepnetError(f"{what} {path} does not hold a repnet checkpoint")
    digest = obj.pop(DIGEST_KEY, None)
    if verify and (digest is None or digest != content_digest(obj)):
        raise RepnetError(f"{what} {path} is damaged (its checksum does not match its content)"
                          if digest is not None else f"{what} {path} carries no checksum: not written by repnet")
    return obj


def load_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(..., weights_only=True)``, every failure as one line (never PyTorch's advice to unpickle anyway)."""
    path = Path(path)
    if not path.is_file():
        raise RepnetError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise RepnetError(f"could not read {what} {path}: refused, it holds objects other than tensors and "
                              "plain values (a pickle that could run code)") from None
        raise RepnetError(f"could not read {what} {path}: damaged or not a PyTorch file ({first[:200]})") from None
    except Exception as e:  # noqa: BLE001 - zip / EOF / runtime errors from a damaged file come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RepnetError(f"could not read {what} {path}: damaged or not a PyTorch file "
                          f"({type(e).__name__}: {first[:200]})") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """``json.load`` with one-line errors (missing, unreadable, not JSON)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RepnetError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RepnetError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise RepnetError(f"{what} {path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- safetensors
def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` with their digest in the file's metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: content_digest(dict(sorted(tensors.items())))}
    return save(tensors, metadata=meta)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` as safetensors, atomically, with their digest in the file's metadata."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


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

    check(obj)
    return obj
