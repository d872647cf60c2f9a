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


def write_nifti_gz(image, path: str, level: int | None = None) -> None:
    """Write a single-file nibabel image; gzip with mtime 0 when ``path`` ends in ``.gz``."""
    import gzip

    import nibabel as nib
    from nibabel.fileholders import FileHolder

    if not str(path).endswith(".gz"):
        nib.save(image, path)
        return
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=6 if level is None else level, mtime=0) as gz:
        image.to_file_map({"image": FileHolder(fileobj=gz), "header": FileHolder(fileobj=gz)})
