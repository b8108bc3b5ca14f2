"""``repnet list``: backbones, methods (with -v: their options), continual methods, datasets.

The registries are the one source of the listing; building them imports torch, timm and every
backbone (seconds). The printed text is therefore kept in a cache file keyed by the package's
source files (path, size, mtime of every ``.py`` / ``.yaml``), so that every later ``repnet
list`` starts in well under a second and a changed or added file is listed afresh. The file carries
a SHA-256 of its text; one that does not verify (garbage, truncated, a device) is rebuilt. Cache folder:
``$REPNET_CACHE``, else ``$XDG_CACHE_HOME/repnet``, else ``~/.cache/repnet``; a folder we cannot
write only costs the speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from pathlib import Path

HELP = "backbones, methods (with -v: their options), runtimes, datasets"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true")


def cache_file(verbose: bool) -> Path:
    root = Path(__file__).resolve().parents[1]  # the repnet package
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    base = os.environ.get("REPNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "repnet")
    return Path(base) / f"list-{h.hexdigest()[:20]}{'-v' if verbose else ''}.txt"


#: The first line of a cache file: this tag and the SHA-256 of the text after it.
CACHE_HEADER = "repnet-list-cache/1 sha256="
CACHE_MAX_BYTES = 1 << 20


def read_cache(path: Path) -> str | None:
    """The cached listing, or None when there is none or it does not verify: not a regular file (a device, a
    pipe: never opened), too large, no header, a checksum that does not match (garbage, truncated, edited),
    not UTF-8."""
    import stat

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > CACHE_MAX_BYTES:
            return None
        raw = path.read_bytes()
    except OSError:
        return None
    head, sep, body = raw.partition(b"\n")
    if not sep or not head.startswith(CACHE_HEADER.encode()) or \
            head[len(CACHE_HEADER):].decode("ascii", "replace") != hashlib.sha256(body).hexdigest():
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def write_cache(path: Path, text: str) -> None:
    """Write the listing with its header (atomically); a cache we cannot write only costs the speed."""
    body = text.encode("utf-8")
    try:
        from repnet.storage import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, f"{CACHE_HEADER}{hashlib.sha256(body).hexdigest()}\n".encode() + body)
    except Exception:  # noqa: BLE001 - a read-only / full / odd cache folder: the listing is printed all the same
        pass


def run(args) -> int:
    cache = cache_file(args.verbose)
    text = read_cache(cache)
    if text is None:  # none yet, or it does not verify: rebuilt from the registries
        text = listing(args.verbose)
        write_cache(cache, text)
    print(text, end="")
    return 0


def listing(verbose: bool) -> str:
    from repnet.backbones import BACKBONES
    from repnet.continual.methods import CONTINUAL_METHODS
    from repnet.data import DATASETS
    from repnet.methods import METHODS
    from repnet.runtime import RUNTIMES

    lines = ["backbones:"]
    lines += [f"  {n:<22} {BACKBONES.help(n)}" for n in BACKBONES.names(with_prefixes=True)]
    lines.append("methods:")
    for n in METHODS.names():
        lines.append(f"  {n:<22} {METHODS.help(n)}")
        if verbose:
            lines += _options(METHODS.get(n).Options)
    lines.append("continual methods (repnet continual; every method above is one too: an adapter per task):")
    for n in CONTINUAL_METHODS.names():
        lines.append(f"  {n:<22} {CONTINUAL_METHODS.help(n)}")
        if verbose:
            lines += _options(CONTINUAL_METHODS.get(n).Options)
    lines.append("runtimes (repnet train --runtime):")
    lines += [f"  {n:<22} {RUNTIMES.help(n)}" for n in RUNTIMES.names()]
    lines.append("datasets:")
    lines += [f"  {n:<22} {DATASETS.help(n)}" for n in DATASETS.names(with_prefixes=True)]
    return "\n".join(lines) + "\n"


def _options(cls) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        ch = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, ch))}]" if ch else ""
        out.append(f"      --opt {f.name}={f.default}{extra}  {f.metadata.get('help', '')}")
    return out
