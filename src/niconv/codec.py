"""Deterministic .npz / .nii.gz encoding (placeholder: standard library deflate)."""
from __future__ import annotations

import io
import zipfile

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: str, arrays: dict[str, np.ndarray], compressed: bool = True, level: int | None = None) -> None:
    """Write ``arrays`` as an ``.npz`` (zip of ``.npy`` members) readable by ``np.load``.

    Members are written in the given order with a fixed timestamp, so the bytes
    depend only on the arrays.
    """
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=level, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            arr = np.asanyarray(arr)
            with zf.open(info, "w", force_zip64=arr.nbytes > 2**31) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
