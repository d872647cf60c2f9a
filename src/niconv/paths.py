"""Path rules: config-relative resolution, and keeping outputs inside the output root."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import OutputError


def resolve_path(value: Any, info: Any) -> Any:
    """Resolve a relative path against the config file's folder.

    Usable as a pydantic ``mode="before"`` field validator: the folder comes from
    the validation context's ``base`` (set by :func:`niconv.config.load_config`),
    else the current folder. ``~`` is expanded; the result is normalised.
    """
    if value is None:
        return None
    base = ((getattr(info, "context", None) or {}).get("base")) or "."
    p = Path(os.path.expanduser(str(value)))
    return Path(os.path.normpath(p if p.is_absolute() else Path(base) / p))


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
