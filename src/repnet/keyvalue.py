"""``key=value`` settings: the one parser and the one value coercer.

Everything a user types as ``key=value`` - ``--opt`` (method options), ``--set`` (training
config keys), ``--weights BACKBONE=PATH``, the ``name@key=value`` method specs of the demo and the
benchmarks - is split by :func:`parse_pairs` and brought to its field's type by :func:`coerce_value`,
so the same spelling means the same everywhere: booleans ``true/false/yes/no/on/off/1/0``, integers
``8`` (not ``8.5``, not ``true``), floats ``3e-4``, ``none``/``null`` for optional fields,
and ``{a: 1}`` (YAML) for mappings.
"""
from __future__ import annotations

import math
from typing import Any

from repnet.errors import RepnetError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_pairs(pairs, what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; anything without ``=`` is one line."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise RepnetError(f"{what} expects key=value, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def type_name(annotation: Any) -> str:
    """A dataclass field's type as the string its annotation spells (``"int | None"``)."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def coerce_value(value: Any, typ: str, key: str) -> Any:
    """Bring ``value`` (a command-line string, or a YAML / Python value) to type ``typ``.

    ``typ`` is the annotation string of a config or option field: ``bool``, ``int``,
    ``float``, ``str``, ``dict``, each optionally ``| None``.
    """
    optional = "None" in typ
    base = typ.replace("| None", "").replace("None |", "").strip()
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise RepnetError(f"{key} cannot be empty")
    bad = RepnetError(f"{key}={value!r}: expected {_describe(base)}")
    if base == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise bad
    if base == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).strip())
        except ValueError:
            raise bad from None
        if not math.isfinite(f) or f != int(f):
            raise bad
        return int(f)
    if base == "float":
        if isinstance(value, bool):
            raise bad
        try:
            return float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise bad from None
    if base == "dict":
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if isinstance(value, (dict, list)):
        raise bad
    return str(value)


def _describe(base: str) -> str:
    return {"bool": "a bool (true / false)", "int": "int (a whole number)", "float": "float (a number)",
            "dict": "a mapping", "str": "a string"}.get(base, base)
