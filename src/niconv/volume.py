"""Reading images: every format nibabel reads, checked before allocating, no float64 blow-ups.

Dtype policy (the ``scaling`` argument of :func:`read_volume`)
----------------------------------------------------------------
``"float32"`` (default)
    Images whose stored values are scaled on load (NIfTI/Analyze ``scl_slope`` /
    ``scl_inter`` per the NIfTI-1 standard, SPM Analyze ``funused1``, MINC
    image-min/max, PAR/REC scale factors) yield nibabel's scaled values as
    ``float32``. Unscaled images keep their stored dtype exactly (``int16`` stays
    ``int16``); big-endian data is returned in native byte order.
``"raw"``
    The stored integers as they are in the file, and the linear slope/intercept
    in :attr:`Volume.scaling` so a writer can save them beside the array.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .errors import InputError, SkippedInput

# Entry-point file name endings (lower case) that a scan picks up by default. Companion
# files (.img of an .hdr pair, .rec of PAR, .brik of AFNI) are read through their entry point.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".mnc", ".hdr", ".par", ".head", ".dcm")
ARRAY_SUFFIXES = (".npz", ".npy")
_STRIP_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES + (".img", ".rec", ".brik", ".brik.gz", ".gz")

# Deflate cannot compress better than about 1032:1, so a .gz whose header claims more
# voxel bytes than that is corrupt: reject it before allocating anything.
_MAX_DEFLATE_RATIO = 1100


class MissingInput(InputError, FileNotFoundError):
    """An input file that does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class Volume:
    """One image read from disk.

    Attributes
    ----------
    path : str
        The file read.
    image : nibabel.spatialimages.SpatialImage
        The nibabel image (header, affine); its data is not loaded again.
    data : numpy.ndarray
        Voxel array, shape ``(X, Y, Z[, T, ...])`` in the file's voxel order,
        dtype per the module's dtype policy.
    scaling : tuple of float or None
        ``(slope, intercept)`` of a linear scale that ``data`` does *not* have
        applied (``scaling="raw"``), else None.
    """

    path: str
    image: object
    data: np.ndarray
    scaling: tuple[float, float] | None = None

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world (RAS+ mm) affine, shape ``(4, 4)``, float64."""
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def zooms(self) -> tuple[float, ...]:
        """Voxel sizes from the header (mm; seconds for a time axis)."""
        return tuple(float(z) for z in self.image.header.get_zooms())

    @property
    def axcodes(self) -> str:
        """Orientation codes of the voxel axes (``nib.aff2axcodes``), e.g. ``LAS``."""
        return "".join(c or "?" for c in nib.aff2axcodes(self.affine))

    @property
    def stored_dtype(self) -> np.dtype:
        """The dtype of the values stored in the file."""
        return np.dtype(self.image.get_data_dtype())


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image/array extensions: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = Path(path).name
    low = name.lower()
    for suffix in sorted(_STRIP_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def check_input_file(path: str | os.PathLike) -> Path:
    """Fail early, in words, for inputs that are not regular readable files.

    Raises
    ------
    MissingInput
        If ``path`` does not exist (a dangling or looping symlink counts).
    InputError
        If it is a folder, empty, or not readable.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise MissingInput(str(p), "file not found") from exc
    except OSError as exc:  # ELOOP: symlink loop
        raise InputError(str(p), f"cannot open: {exc.strerror}") from exc
    if p.is_dir():
        raise InputError(str(p), "is a folder, not an image file")
    if st.st_size == 0:
        raise InputError(str(p), "file is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise InputError(str(p), "permission denied: the file is not readable")
    return p


def load_image(path: str | os.PathLike):
    """Open an image with nibabel, header only, after checking the file.

    Raises
    ------
    MissingInput, InputError, SkippedInput
        For a missing, unreadable or corrupt file, or a format nibabel cannot read.
    """
    p = check_input_file(path)
    if _is_dicom(p):
        raise SkippedInput(
            str(p), "DICOM is not supported yet; convert the series to NIfTI first (e.g. with dcm2niix)"
        )
    try:
        img = nib.load(str(p))
    except FileNotFoundError as exc:  # a missing companion file (.img of .hdr, .REC of .PAR)
        raise InputError(str(p), f"companion file missing: {exc.filename or exc}") from exc
    except ImageFileError as exc:
        raise InputError(str(p), f"not an image nibabel can read ({_first_line(exc)})") from exc
    except (HeaderDataError, ValueError, KeyError, struct.error) as exc:
        raise InputError(str(p), f"invalid header: {_first_line(exc)}") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(str(p), f"file is truncated or not valid gzip ({_first_line(exc)})") from exc
    except OSError as exc:
        raise InputError(str(p), f"cannot read: {_first_line(exc)}") from exc
    except Exception as exc:  # nibabel format readers raise many types for corrupt files
        raise InputError(str(p), f"cannot read image header ({type(exc).__name__}: {_first_line(exc)})") from exc
    _check_data_size(p, img)
    return img


def read_volume(path: str | os.PathLike, scaling: str = "float32") -> Volume:
    """Read an image and its voxel array without float64 copies.

    Parameters
    ----------
    path : str or path-like
        Any image nibabel reads (NIfTI-1/2, Analyze, MGH/MGZ, MINC1/2, PAR/REC, AFNI).
    scaling : {"float32", "raw"}
        Dtype policy for scaled images; see the module docstring.

    Returns
    -------
    Volume

    Raises
    ------
    MissingInput
        If the file does not exist.
    InputError
        If it is not a readable image, is truncated, or its header is invalid.
    SkippedInput
        For DICOM files (not supported yet).
    """
    img = load_image(path)
    p = str(path)
    try:
        data, linear = _read_data(img, scaling)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(p, f"not enough memory to load {img.shape} voxels") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(p, f"file is truncated or its compressed data is corrupt ({_first_line(exc)})") from exc
    except Exception as exc:
        raise InputError(p, f"cannot read voxel data ({type(exc).__name__}: {_first_line(exc)})") from exc
    if data.dtype.byteorder not in ("=", "|") and data.dtype.fields is None:
        data = data.astype(data.dtype.newbyteorder("="))
    return Volume(path=p, image=img, data=data, scaling=linear)


def _read_data(img, scaling: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    proxy = img.dataobj
    if isinstance(proxy, ArrayProxy) and hasattr(proxy, "slope"):
        slope, inter = float(proxy.slope), float(proxy.inter)
        if not (np.isfinite(slope) and np.isfinite(inter)):
            raise InputError(proxy.file_like if isinstance(proxy.file_like, str) else "",
                             f"scale factors are not finite (scl_slope={slope}, scl_inter={inter})")
        stored = proxy.get_unscaled()
        if slope == 1.0 and inter == 0.0:
            return stored, None
        if scaling == "raw":
            return stored, (slope, inter)
        # scale in float32 in place: 2x the stored size instead of nibabel's float64 (4x for int16)
        out = stored.astype(np.float32)
        if slope != 1.0:
            out *= np.float32(slope)
        if inter != 0.0:
            out += np.float32(inter)
        return out, None
    data = np.asanyarray(proxy)
    stored_dtype = np.dtype(img.get_data_dtype())
    if data.dtype == np.float64 and stored_dtype != np.float64:
        # a per-slice scaled format (MINC, PAR/REC): nibabel returns float64
        data = data.astype(np.float32)
    return data, None


def _check_data_size(p: Path, img) -> None:
    """Reject headers that claim more voxel data than the file can hold."""
    header = img.header
    try:
        nbytes = int(np.prod(img.shape, dtype=np.int64)) * np.dtype(img.get_data_dtype()).itemsize
    except (TypeError, ValueError):
        return
    offset = int(header.get("vox_offset", 0)) if hasattr(header, "get") and "vox_offset" in header else 0
    files = img.file_map
    image_file = files["image"].filename if "image" in files else str(p)
    if image_file is None:
        return
    size = os.path.getsize(image_file) if os.path.exists(image_file) else 0
    low = str(image_file).lower()
    if low.endswith(".gz") or low.endswith(".mgz"):
        if nbytes > size * _MAX_DEFLATE_RATIO:
            raise InputError(str(p), f"header claims {_fmt_shape(img.shape)} voxels ({nbytes} bytes) "
                                     f"but the compressed file has only {size} bytes")
        isize = _gzip_isize(image_file)
        expected = (offset + nbytes) % 2**32
        if isize is not None and low.endswith(".nii.gz") and isize < expected:
            raise InputError(str(p), f"file is truncated: header says {offset + nbytes} bytes "
                                     f"uncompressed, the gzip stream holds {isize}")
    elif low.endswith((".nii", ".img")):
        if offset > size:
            raise InputError(str(p), f"vox_offset {offset} points past the end of the file ({size} bytes)")
        if offset + nbytes > size:
            raise InputError(str(p), f"file is truncated: header says {_fmt_shape(img.shape)} voxels of "
                                     f"{img.get_data_dtype()} ({nbytes} bytes from offset {offset}), "
                                     f"the file has only {size - offset} bytes of data")


def _gzip_isize(path: str) -> int | None:
    """The gzip trailer's ISIZE (uncompressed size mod 2**32), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    except OSError:
        return None


def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def read_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read a NumPy array from ``.npy`` (memory-mapped) or ``.npz``.

    For ``.npz``: the member ``key`` if given, else ``"data"`` when present,
    else the first array.

    Raises
    ------
    MissingInput
        If the file does not exist.
    InputError
        If it is not a readable ``.npy``/``.npz``, holds no array, lacks ``key``,
        or holds Python objects (never unpickled).
    """
    p = check_input_file(path)
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise InputError(str(p), "the .npz holds no array")
                name = key or ("data" if "data" in names else names[0])
                if name not in names:
                    raise InputError(str(p), f"no array named '{name}' (found: {', '.join(names)})")
                return archive[name]
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise InputError(str(p), f"not a readable NumPy file ({_first_line(exc)})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise InputError(str(p), f"not a readable NumPy file ({type(exc).__name__}: {_first_line(exc)})") from exc
