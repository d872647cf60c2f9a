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

import errno
import gzip
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from . import codec
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
        If ``path`` does not exist (a dangling symlink counts).
    InputError
        If it is a folder, a named pipe or device (reading one could block
        forever), a symlink loop, empty, or not readable.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        if p.is_symlink():
            raise MissingInput(str(p), f"broken symbolic link: its target {os.readlink(p)} does not exist") from exc
        raise MissingInput(str(p), "file not found") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(str(p), "symbolic link loop: the link points (through other links) back to "
                                     "itself, so there is no file to read") from exc
        raise InputError(str(p), f"cannot open: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise InputError(str(p), "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        raise InputError(str(p), f"is {kind}, not a regular file; niconv does not read it (it could block forever)")
    if st.st_size == 0:
        raise InputError(str(p), "file is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise InputError(str(p), "permission denied: the file is not readable")
    return p


def load_image(path: str | os.PathLike):
    """Open an image with nibabel, header only, after checking the file.

    Beyond nibabel's own checks, the header must describe data the file can
    hold (rejected before any voxel is allocated), a header/data pair must have
    its data file, and NIfTI scale factors must be finite numbers.

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
        try:
            img = nib.load(str(p))
        except FileNotFoundError as exc:
            if not (exc.filename and Path(exc.filename).name.lower() == p.name.lower()):
                raise
            img = _load_as_named(p)
    except FileNotFoundError as exc:  # a missing companion file (.img of .hdr, .REC of .PAR)
        raise InputError(str(p), f"companion data file missing: {exc.filename or exc}") from exc
    except Exception as exc:  # nibabel format readers raise many types for corrupt files
        raise InputError(str(p), _load_failure(p, exc)) from exc
    _check_companion(p, img)
    _check_data_size(p, img)
    _check_scale_factors(p, img)
    return img


def _load_as_named(p: Path):
    """Load a single-file image under its exact name.

    nibabel rebuilds a file name from its extension in lower case unless the
    extension is all upper case, so ``scan.Nii`` is looked for as ``scan.nii``.
    """
    from nibabel.fileholders import FileHolder

    sniff = None
    for klass in nib.imageclasses.all_image_classes:
        is_image, sniff = klass.path_maybe_image(str(p), sniff)
        if is_image and len(klass.files_types) == 1:
            return klass.from_file_map({klass.files_types[0][0]: FileHolder(filename=str(p))})
    raise FileNotFoundError(errno.ENOENT, "no such file", str(p))


def _load_failure(p: Path, exc: BaseException) -> str:
    """Plain words for a file nibabel refused: a mislabelled file first, then the header problem."""
    mismatch = _content_mismatch(p)
    if mismatch:
        return mismatch
    text = _first_line(exc)
    m = re.search(r"data code (\S+) not (recognized|supported)", text)
    if m:
        return f"unsupported data type code {m.group(1)} in the header (not a voxel type niconv can read)"
    m = re.search(r"invalid intercept (\S+)", text)
    if m:
        return (f"the scale factor scl_inter in the header is {m.group(1)}, not a finite number, "
                "so the voxel values cannot be computed (damaged header)")
    if isinstance(exc, ImageFileError):
        return f"not an image nibabel can read ({text})"
    if isinstance(exc, (HeaderDataError, ValueError, KeyError, struct.error)):
        return f"invalid header: {text}"
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"file is truncated or not valid gzip ({text})"
    if isinstance(exc, OSError):
        return f"cannot read: {text}"
    return f"cannot read image header ({type(exc).__name__}: {text})"


# magic bytes of formats a cohort folder may hold by mistake, for messages only
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"),
          (b"MM\x00*", "a TIFF image"), (b"PK\x03\x04", "a ZIP archive (a NumPy .npz?)"),
          (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file"), (b"CDF\x01", "a NetCDF file"),
          (b"%PDF", "a PDF document"), (b"BZh", "bzip2-compressed data"), (b"\xfd7zXZ", "xz-compressed data"))


def _content_mismatch(p: Path) -> str | None:
    """A message if the file's bytes are plainly not what its name says, else None."""
    try:
        with open(p, "rb") as f:
            head = f.read(544)
    except OSError:
        return None
    low = p.name.lower()
    gz = head[:2] == b"\x1f\x8b"
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if kind is None and (head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")):
        kind = "an uncompressed NIfTI image"
    if low.endswith((".gz", ".mgz")):
        if gz:
            return None
        suffix = ".mgz" if low.endswith(".mgz") else ".gz"
        hint = f"; rename it to {p.name[:-3]}" if kind == "an uncompressed NIfTI image" and suffix == ".gz" else ""
        return f"the name ends in {suffix} but the file is not gzip-compressed (it is {kind or 'something else'}){hint}"
    if gz:
        return f"the file is gzip-compressed but its name does not end in .gz; rename it to {p.name}.gz"
    if kind and kind != "an uncompressed NIfTI image":
        return f"not a medical image: the file is {kind}"
    return None


def _check_companion(p: Path, img) -> None:
    """A header/data pair (.hdr/.img) needs its data file; nibabel only notices when reading voxels."""
    holder = img.file_map.get("image")
    data_file = getattr(holder, "filename", None)
    if data_file and os.path.abspath(data_file) != os.path.abspath(p) and not os.path.exists(data_file):
        raise InputError(str(p), f"the data file {Path(data_file).name} that belongs to this header is missing "
                                 "(a header/data pair needs both files side by side)")


def _check_scale_factors(p: Path, img) -> None:
    """:func:`niconv.codec.check_scale_factors` on the header as stored (nibabel resets its copy)."""
    if not isinstance(img.header, nib.Nifti1Header):
        return
    holder = img.file_map.get("header") or img.file_map.get("image")
    try:
        with holder.get_prepare_fileobj("rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
        slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    except Exception:  # the header was read once already; a second failure is not this check's business
        return
    codec.check_scale_factors(slope, inter, str(p))


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
        If it is not a readable image, is truncated, its header is invalid, or
        it has no voxels (a zero in its shape).
    SkippedInput
        For DICOM files (not supported yet).
    """
    p = str(path)
    fast = _read_nifti_gz(p, scaling) if p.lower().endswith(".nii.gz") else None
    if fast is not None:
        img, data, linear = fast
    else:
        img, data, linear = _read_voxels(load_image(path), p, scaling)
    if data.size == 0:
        raise InputError(p, f"the image has no voxels: its header gives the shape {_fmt_shape(data.shape)}")
    if data.dtype.kind in "fc" and not _any_finite(data):
        raise InputError(p, "every voxel is NaN or infinite: the image holds no usable values")
    return Volume(path=p, image=img, data=data, scaling=linear)


def _read_nifti_gz(p: str, scaling: str):
    """The common case in one pass: one libdeflate call, one header parse (no ``nib.load``).

    Returns ``(image, data, linear)``, or None when the file is not a sound
    single-file NIfTI: then :func:`load_image` and nibabel's reader word the problem.
    """
    check_input_file(p)
    try:
        return codec.read_nifti(p, scaling)
    except codec.OverlongStream:
        raise  # the header is sound; reading the file again would stop at the same place
    except InputError:
        return None
    except MemoryError as exc:
        raise InputError(p, "not enough memory to read the voxels") from exc


def _read_voxels(img, p: str, scaling: str):
    """``(image, data, linear)`` of an image opened by :func:`load_image`: voxels per the
    dtype policy, in native byte order."""
    try:
        if _is_nifti_gz(img, p):
            # one libdeflate call into one buffer; the voxels are a view of it (no second copy)
            img, data, linear = codec.read_nifti(p, scaling)
        else:
            data, linear = _read_data(img, scaling)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(p, f"not enough memory to load {img.shape} voxels") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(p, f"file is truncated or its compressed data is corrupt ({_first_line(exc)})") from exc
    except Exception as exc:
        raise InputError(p, f"cannot read voxel data ({type(exc).__name__}: {_first_line(exc)})") from exc
    if not data.dtype.isnative and data.dtype.fields is None:
        data = data.astype(data.dtype.newbyteorder("="))
    return img, data, linear


def _any_finite(data: np.ndarray, block: int = 1 << 20) -> bool:
    """True if any value is finite; stops at the first block that has one (usually the first)."""
    flat = data.ravel(order="K")  # a view for the contiguous arrays nibabel returns
    for start in range(0, flat.size, block):
        if np.isfinite(flat[start:start + block]).any():
            return True
    return False


def _is_nifti_gz(img, p: str) -> bool:
    return isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and p.lower().endswith(".gz")


def _read_data(img, scaling: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    proxy = img.dataobj
    if isinstance(proxy, ArrayProxy) and hasattr(proxy, "slope"):
        slope, inter = float(proxy.slope), float(proxy.inter)
        if not (np.isfinite(slope) and np.isfinite(inter)):
            raise InputError(proxy.file_like if isinstance(proxy.file_like, str) else "",
                             f"scale factors are not finite (scl_slope={slope}, scl_inter={inter})")
        return codec.apply_scaling(proxy.get_unscaled(), slope, inter, scaling)
    data = np.asanyarray(proxy)
    stored_dtype = np.dtype(img.get_data_dtype())
    if data.dtype == np.float64 and stored_dtype != np.float64:
        # a per-slice scaled format (MINC, PAR/REC): nibabel returns float64
        data = data.astype(np.float32)
    return data, None


def image_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of an image uncompressed, as its header describes it: header and extensions
    plus the voxel data.

    Read from the first bytes of NIfTI-1/2 (``.nii``, ``.nii.gz``) and MGH
    (``.mgh``, ``.mgz``) files only, so a cohort of thousands is sized in well
    under a second, and a small ``.gz`` whose trailer announces gigabytes is
    sized by what its header describes (the reader inflates no more than that).

    Returns
    -------
    int or None
        Bytes (a Python integer: a corrupt header may claim more than any
        machine has); None for other formats or a header that cannot be read
        (the task reports that file itself).
    """
    low = str(path).lower()
    try:
        if low.endswith((".nii", ".nii.gz")):
            offset, shape, dtype = codec.nifti_extent(codec.file_prefix(path, 540), str(path))
        elif low.endswith((".mgh", ".mgz")):
            header = nib.freesurfer.mghformat.MGHHeader(codec.file_prefix(path, 284), check=False)
            offset, dtype = int(header.get_data_offset()), header.get_data_dtype()
            shape = tuple(int(n) for n in header.get_data_shape())
        else:
            return None
    except Exception:  # noqa: BLE001 - an unreadable header fails in its own task, in words
        return None
    return offset + math.prod(shape) * dtype.itemsize


def _check_data_size(p: Path, img) -> None:
    """Reject headers that claim more voxel data than the file can hold, before allocating it."""
    try:
        # Python integers: a corrupt header's dimensions must not overflow int64 into a small number
        nbytes = math.prod(int(s) for s in img.shape) * np.dtype(img.get_data_dtype()).itemsize
    except (TypeError, ValueError):
        return
    proxy = getattr(img, "dataobj", None)
    # the proxy's offset is where nibabel will read; the header's vox_offset is reset on load
    offset = int(getattr(proxy, "offset", 0) or 0) if isinstance(proxy, ArrayProxy) else 0
    files = img.file_map
    image_file = files["image"].filename if "image" in files else str(p)
    if image_file is None:
        return
    size = os.path.getsize(image_file) if os.path.exists(image_file) else 0
    low = str(image_file).lower()
    claim = f"{_fmt_shape(img.shape)} voxels of {np.dtype(img.get_data_dtype()).name} ({_fmt_bytes(nbytes)})"
    if low.endswith(".gz") or low.endswith(".mgz"):
        if nbytes > size * _MAX_DEFLATE_RATIO:
            raise InputError(str(p), f"the header claims {claim} but the compressed file has only "
                                     f"{_fmt_bytes(size)}, more than compression can explain: the header is corrupt")
        isize = _gzip_isize(image_file)
        expected = (offset + nbytes) % 2**32
        if isize is not None and low.endswith(".nii.gz") and isize < expected:
            raise InputError(str(p), f"file is truncated: header says {offset + nbytes} bytes "
                                     f"uncompressed, the gzip stream holds {isize}")
    elif low.endswith((".nii", ".img")):
        if offset > size:
            raise InputError(str(p), f"vox_offset {offset} points past the end of the file ({size} bytes): "
                                     "the header is corrupt")
        if nbytes > 1000 * max(size, 1):
            raise InputError(str(p), f"the header claims {claim} but the file has only {_fmt_bytes(size)}: "
                                     "the header is corrupt")
        if offset + nbytes > size:
            raise InputError(str(p), f"file is truncated: the header says {claim} from byte {offset}, "
                                     f"the file holds only {size - offset} bytes of voxel data")


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


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
