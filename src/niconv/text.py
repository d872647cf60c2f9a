"""How niconv writes values as text, in messages and in log rows.

Shapes ``128x96x24``, zooms ``2x2x2.2``, dtypes as NumPy names (``rgb24`` for
NIfTI colour voxels), byte counts ``54.0 TB``, and the first line of a
library's error message. Imports nothing of niconv, so any module may use it.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def fmt_shape(shape: Iterable) -> str:
    """``(128, 96, 24)`` -> ``128x96x24`` (Python integers: any size, no wrap-around)."""
    return "x".join(str(int(s)) for s in shape)


def fmt_zooms(zooms: Iterable) -> str:
    """``(2.0, 2.0, 2.2, 2000.0)`` -> ``2x2x2.2x2000`` (6 significant digits)."""
    return "x".join(f"{float(z):.6g}" for z in zooms)


def fmt_dtype(dtype) -> str:
    """NumPy dtype name (``int16``, whatever the byte order); NIfTI's RGB24/RGBA32 structured
    dtypes as ``rgb24``/``rgba32``; other structured dtypes as NumPy writes them."""
    dt = np.dtype(dtype)
    if dt.fields is None:
        return dt.name
    names = "".join(dt.names).lower()
    if names in ("rgb", "rgba") and all(dt.fields[n][0] == np.uint8 for n in dt.names):
        return "rgb24" if names == "rgb" else "rgba32"
    return str(dt)


def fmt_bytes(n: int) -> str:
    """A byte count for people: ``54.0 TB``, ``67.7 kB``, ``352 bytes`` (powers of 1000)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def first_line(what: BaseException | str, empty: str | None = None) -> str:
    """The first line of an exception's message (or of a text), at most 300 characters.

    ``empty`` is said when there is no text (default: the exception's class
    name, for an exception; ``""`` for a text).
    """
    text = str(what).strip()
    if not text:
        return empty if empty is not None else (type(what).__name__ if isinstance(what, BaseException) else "")
    return text.splitlines()[0][:300]
