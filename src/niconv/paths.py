"""Path rules: config-relative resolution, and keeping outputs inside the output root."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from .errors import OutputError


# config keys that name a file; every other path key names a folder
_FILE_KEYS = {"log", "csv"}


def resolve_path(value: Any, info: Any) -> Any:
    """Resolve a relative path against the config file's folder.

    Usable as a pydantic ``mode="before"`` field validator: the folder comes from
    the validation context's ``base`` (set by :func:`niconv.config.load_config`),
    else the current folder. ``~`` is expanded; the result is normalised. None
    stays None (an optional key left unset).

    Raises
    ------
    ValueError
        If ``value`` is not text or a path (a list, a mapping, a number, a
        yes/no value, a date) or is empty: it is never turned into a name.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        kind = "file" if getattr(info, "field_name", None) in _FILE_KEYS else "folder"
        raise ValueError(f"expected a {kind} path, found {_kind(value, kind)}")
    base = ((getattr(info, "context", None) or {}).get("base")) or "."
    p = Path(os.path.expanduser(str(value)))
    return Path(os.path.normpath(p if p.is_absolute() else Path(base) / p))


def _kind(value: Any, kind: str) -> str:
    """What a YAML value that is not a path is, in words."""
    quote = f"; quote it if a {kind} has that name"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value){quote}"
    if isinstance(value, (int, float, datetime.date, datetime.time)):
        what = "the number" if isinstance(value, (int, float)) else "the date"
        text = str(value)
        return f"{what} {text if len(text) <= 40 else text[:37] + '...'}{quote}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (set, frozenset)):
        return "a set"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, str):
        return "an empty string"
    return f"a value of type {type(value).__name__}"


def inside(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing anything that would land outside ``root``.

    Raises
    ------
    OutputError
        If ``relative`` is absolute or climbs out of ``root`` with ``..``.
    """
    base = Path(os.path.abspath(root))
    target = Path(os.path.abspath(base / relative))
    if Path(relative).is_absolute() or not (target == base or base in target.parents):
        raise OutputError(str(relative), f"output path would leave the output root {base}")
    return target


def within(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or lies below it; both absolute and normalised (real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
