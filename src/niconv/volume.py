"""Reading images: every volume nibabel reads, checked before allocating, no float64 copies.

One route reads every image (:func:`open_volume`): single-file NIfTI
(``.nii``, ``.nii.gz``) in one pass by :func:`niconv.nifti.open_nifti`, every
other format by nibabel; either way the file is parsed once. Every image's
values then come from :func:`image_data`, which applies each format's own
scaling and gives the voxels in ``(X, Y, Z[, T, ...])`` order.

Dtype policy (the ``scaling`` argument of :func:`read_volume`)
----------------------------------------------------------------
``"float32"`` (default)
    Images whose stored values are scaled on load yield nibabel's values
    (``np.asanyarray(img.dataobj)``, computed in float64) rounded once to
    ``float32``: NIfTI/Analyze ``scl_slope`` / ``scl_inter``, SPM Analyze
    ``funused1``, AFNI ``BRICK_FLOAT_FACS`` (one factor per volume), PAR/REC
    per-slice scale factors, MINC image-min/image-max. Unscaled images keep
    their stored dtype exactly (``int16`` stays ``int16``); big-endian data
    is returned in native byte order.
``"raw"``
    The stored values as they are in the file, and in :attr:`Volume.scaling`
    the :class:`Scale` that gives the values (stored * slope + inter), so a
    writer can save it beside the array: a slope and an intercept for
    NIfTI/Analyze, arrays that broadcast against the data for AFNI (per
    volume) and PAR/REC (per slice). Refused for scaled MINC files, whose
    values are not a slope and intercept of the stored values (they are
    clipped to the valid range first). MGH files are never scaled.
"""
from __future__ import annotations

import errno
import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.brikhead import AFNIImage
from nibabel.filebasedimages import ImageFileError
from nibabel.parrec import PARRECImage
from nibabel.spatialimages import SpatialImage

from . import codec, nifti
from .errors import InputError, SkippedInput, UnsupportedInput
from .ops.orientation import axcodes
from .text import first_line, fmt_shape

# Entry-point file name endings (lower case) that a scan picks up by default. Companion
# files (.img of an .hdr pair, .rec of PAR, .brik of AFNI) are read through their entry point.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".mnc", ".hdr", ".par", ".head", ".dcm")
ARRAY_SUFFIXES = (".npz", ".npy")
_STRIP_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES + (".img", ".rec", ".brik", ".brik.gz", ".gz")


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
        Voxel array, shape ``(X, Y, Z[, T, ...])``: the file's voxel order with
        the space axes first (see :func:`voxel_axes`), dtype per the module's
        dtype policy.
    scaling : Scale or None
        The scaling that ``data`` does *not* have applied (``scaling="raw"``
        on a scaled image), else None.
    axes : tuple of int or None
        The file axis each axis of ``data`` comes from (MINC with time
        first), or None when ``data`` is in file order.
    """

    path: str
    image: object
    data: np.ndarray
    scaling: Scale | None = None
    axes: tuple[int, ...] | None = None

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world (RAS+ mm) affine of the first three axes of ``data``, shape ``(4, 4)``, float64."""
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def zooms(self) -> tuple[float, ...]:
        """Voxel sizes of ``data``'s axes from the header (mm; seconds for a time axis)."""
        zooms = tuple(float(z) for z in self.image.header.get_zooms())
        return zooms if self.axes is None else tuple(zooms[i] for i in self.axes)

    @property
    def axcodes(self) -> str:
        """Orientation codes of the voxel axes (``nib.aff2axcodes``), e.g. ``LAS``."""
        return axcodes(self.affine)

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

    Beyond nibabel's own checks, the image must be a volume with an affine
    (:func:`check_volume`), the header must describe data the file can hold
    (rejected before any voxel is allocated), a header/data pair must have its
    data file, and NIfTI scale factors must be finite numbers (:func:`check_image`).

    Raises
    ------
    MissingInput, InputError, SkippedInput
        For a missing, unreadable or corrupt file, or a format nibabel cannot read.
    UnsupportedInput
        For an image that is not a volume with an affine (CIFTI-2, GIFTI).
    """
    img = open_image(path)
    check_image(path, img)
    return img


def open_image(path: str | os.PathLike):
    """Open any image nibabel reads, header only, after checking the file; no check that it
    is a volume niconv converts (see :func:`load_image`).

    Raises
    ------
    MissingInput, InputError
        For a missing, unreadable or corrupt file, or a format nibabel cannot read,
        in words (never nibabel's exception).
    SkippedInput
        For an input niconv skips (:func:`skip_reason`).
    """
    p = _readable(path)
    try:
        try:
            return nib.load(str(p))
        except FileNotFoundError as exc:
            if not (exc.filename and Path(exc.filename).name.lower() == p.name.lower()):
                raise
            return _load_as_named(p)
    except FileNotFoundError as exc:  # a missing companion file (.img of .hdr, .REC of .PAR)
        missing = Path(exc.filename).name if exc.filename else "data file"
        raise InputError(str(p), f"the data file {missing} that belongs to this header is missing "
                                 "(a header/data pair needs both files side by side)") from exc
    except Exception as exc:  # nibabel format readers raise many types for corrupt files
        raise InputError(str(p), _load_failure(p, exc)) from exc


def check_image(path: str | os.PathLike, img) -> None:
    """What :func:`load_image` checks beyond nibabel: a volume with an affine, its data file
    present and large enough for the header's claim, finite NIfTI scale factors.

    Raises
    ------
    UnsupportedInput
        For an image that is not a volume with an affine (CIFTI-2, GIFTI).
    InputError
        For a missing data file, a header claiming more data than the file holds,
        or non-finite scale factors.
    """
    p = Path(path)
    check_volume(img, str(p))
    _check_companion(p, img)
    _check_data_size(p, img)
    _check_scale_factors(p, img)


def _readable(path: str | os.PathLike) -> Path:
    """:func:`check_input_file`, then refuse an input niconv skips (:func:`skip_reason`)."""
    p = check_input_file(path)
    skip = skip_reason(p)
    if skip:
        raise SkippedInput(str(p), skip)
    return p


def skip_reason(path: str | os.PathLike) -> str | None:
    """Why niconv skips an input it does not handle yet (DICOM), or None.

    Reads at most 132 bytes: a name ending in ``.dcm``, or the ``DICM`` marker.
    """
    if _is_dicom(Path(path)):
        return "a DICOM file: niconv converts DICOM series in a run (niconv plan lists them), not one file here"
    return None


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
    text = first_line(exc)
    if isinstance(exc, ImageFileError):
        if text.startswith("Cannot work out file type"):
            return _NOT_AN_IMAGE
        return f"not an image nibabel can read ({text})"
    words = nifti.header_problem(exc)
    if words:
        return words
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return codec.corrupt_stream(exc)
    if isinstance(exc, OSError):
        return f"cannot read: {text}"
    return f"cannot read the image header: {text}"


_NOT_AN_IMAGE = "not an image niconv can read: nibabel recognises neither its name nor its content"

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
    """:func:`niconv.nifti.check_scale_factors` on the header as stored (nibabel resets its copy)."""
    if not isinstance(img.header, nib.Nifti1Header):
        return
    holder = img.file_map.get("header") or img.file_map.get("image")
    try:
        with holder.get_prepare_fileobj("rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
        slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    except Exception:  # the header was read once already; a second failure is not this check's business
        return
    nifti.check_scale_factors(slope, inter, str(p))


def read_volume(path: str | os.PathLike, scaling: str = "float32") -> Volume:
    """Read an image and its voxel array, per the dtype policy, without float64 copies.

    Parameters
    ----------
    path : str or path-like
        Any volume nibabel reads (NIfTI-1/2, Analyze/SPM, MGH/MGZ, MINC1/2,
        PAR/REC, AFNI).
    scaling : {"float32", "raw"}
        Dtype policy for scaled images; see the module docstring.

    Returns
    -------
    Volume
        ``data`` in ``(X, Y, Z[, T, ...])`` order, see :func:`image_data`.

    Raises
    ------
    MissingInput
        If the file does not exist.
    InputError
        If it is not a readable image, is truncated, its header is invalid, or
        it has no voxels (a zero in its shape).
    UnsupportedInput
        If it is not a volume with an affine (CIFTI-2, GIFTI), or ``scaling="raw"``
        is asked of a format whose scaling is not a slope and intercept (MINC).
    SkippedInput
        For DICOM files (not supported yet).
    """
    p = str(path)
    img = open_volume(p)
    data, scale = image_data(img, scaling, p)
    if data.size == 0:
        raise InputError(p, f"the image has no voxels: its header gives the shape {fmt_shape(data.shape)}")
    if data.dtype.kind in "fc" and not _any_finite(data):
        raise InputError(p, "every voxel is NaN or infinite: the image holds no usable values")
    if scale is None and isinstance(img.dataobj, nifti.StoredVoxels) and data is not img.dataobj.get_unscaled():
        # keep the values, not the stored values read too, for as long as the volume lives
        img = type(img)(data, img.affine, img.header)
    return Volume(path=p, image=img, data=data, scaling=scale, axes=voxel_axes(img, p))


def open_volume(path: str | os.PathLike):
    """Open an image to read its voxels: the one place that decides how a file is read.

    Single-file NIfTI (a name ending in ``.nii`` or ``.nii.gz``, any case) is
    read in one pass by :func:`niconv.nifti.open_nifti` (a ``.nii.gz`` is
    inflated, a ``.nii`` mapped, when this returns); every other format is
    opened by nibabel, header only (:func:`load_image`). Either way the file is parsed once: a NIfTI file
    that the fast reader refuses is reported in words, not read again.

    Raises
    ------
    MissingInput, InputError, SkippedInput, UnsupportedInput
        As :func:`load_image`; for NIfTI also a truncated or corrupt file
        (:func:`niconv.nifti.open_nifti`), and
        :class:`niconv.codec.OverlongStream` for a decompression bomb.
    """
    if not str(path).lower().endswith(nifti.SUFFIXES):
        return load_image(path)
    p = _readable(path)
    try:
        return nifti.open_nifti(p)
    except nifti.NotNifti as exc:  # the bytes are not what the name says: say what they are
        raise InputError(str(p), _content_mismatch(p) or _NOT_AN_IMAGE) from exc
    except MemoryError as exc:
        raise InputError(str(p), "not enough memory to read the voxels") from exc


# ---------------------------------------------------------------------------------------------
# the dtype policy: one path for every format

# scaling computes in float64 a block at a time, never on a float64 copy of the volume: blocks of
# 64 Ki voxels (512 KiB of float64 for the stored values, as much for the results: about 1 MiB in
# cache) are faster than both smaller and larger ones
_BLOCK_BYTES = 1 << 19
# NIfTI intent codes 3000-3099 are CIFTI's (connectivity matrices, dense scalars, ...)
_CIFTI_INTENTS = range(3000, 3100)
_FORMAT_NAMES = {
    "Nifti1Image": "NIfTI-1", "Nifti2Image": "NIfTI-2", "Nifti1Pair": "NIfTI-1 pair", "Nifti2Pair": "NIfTI-2 pair",
    "AnalyzeImage": "Analyze", "Spm99AnalyzeImage": "SPM Analyze", "Spm2AnalyzeImage": "SPM Analyze",
    "MGHImage": "MGH", "Minc1Image": "MINC1", "Minc2Image": "MINC2", "PARRECImage": "PAR/REC",
    "AFNIImage": "AFNI", "Cifti2Image": "CIFTI-2", "GiftiImage": "GIFTI surface data",
}


@dataclass(frozen=True)
class Scale:
    """How a format turns stored values into the values nibabel gives.

    Attributes
    ----------
    slope, inter : float, numpy.ndarray or None
        Linear formats: value = stored * slope + inter, computed in float64.
        Floats for NIfTI / Analyze (``scl_slope``, ``scl_inter``, SPM's
        ``funused1``); float64 arrays with the data's number of dimensions that
        broadcast against it for AFNI (one factor per volume, shape
        ``(1, 1, 1, T)``, intercept 0.0) and PAR/REC (per slice, shape
        ``(1, 1, Z[, T])``). None for MINC, whose values nibabel computes from
        image-min/image-max per slice after clipping to the valid range.
    kind : str
        The scaling in words, e.g. ``"per slice (PAR/REC)"``.
    """

    slope: float | np.ndarray | None
    inter: float | np.ndarray | None
    kind: str

    @property
    def linear(self) -> bool:
        """True if the values are ``stored * slope + inter``."""
        return self.slope is not None

    def __str__(self) -> str:
        if self.linear and np.ndim(self.slope) == 0 and np.ndim(self.inter) == 0:
            return f"scl_slope={float(self.slope):g} scl_inter={float(self.inter):g}"
        return self.kind


def format_name(img) -> str:
    """A format's usual name (``NIfTI-1``, ``MINC2``, ``PAR/REC``) for messages."""
    name = type(img).__name__
    return _FORMAT_NAMES.get(name, name.removesuffix("Image"))


def check_volume(img, where: str = "") -> None:
    """Refuse images that are not volumes with an affine, before anything is written.

    Raises
    ------
    UnsupportedInput
        For CIFTI-2 (a ``Cifti2Image``, or NIfTI-2 with a CIFTI intent code),
        GIFTI, and any image without a ``(4, 4)`` affine.
    """
    header = getattr(img, "header", None)
    if isinstance(img, nib.Cifti2Image) or (
            isinstance(header, nib.Nifti1Header) and int(header["intent_code"]) in _CIFTI_INTENTS):
        raise UnsupportedInput(where, "CIFTI-2 matrix, not a volume: niconv converts volumes with an affine")
    affine = getattr(img, "affine", None)
    if not isinstance(img, SpatialImage) or affine is None or np.shape(affine) != (4, 4):
        raise UnsupportedInput(where, f"{format_name(img)}, not a volume: niconv converts volumes with an affine")


def voxel_axes(img, where: str = "") -> tuple[int, ...] | None:
    """The file axis each axis of :func:`image_data`'s array comes from, or None for file order.

    Every format stores the three space axes first, except MINC, whose
    dimension names (``xspace``, ``yspace``, ``zspace``, ``time``, ...) may
    come in any order, usually time first. nibabel's MINC affine describes
    the space dimensions in their file order, so moving the space axes first
    (keeping their order) and the others after gives ``(X, Y, Z, T)`` with the
    affine describing the first three axes, as for every other format.

    Raises
    ------
    UnsupportedInput
        A MINC file whose dimension names cannot be read, or that does not
        have exactly three space dimensions.
    """
    if not isinstance(img, nib.Minc1Image):
        return None
    names = getattr(getattr(img.dataobj, "minc_file", None), "_dim_names", None)
    if names is None or len(names) != len(img.shape):
        if len(img.shape) == 3:
            return None  # three axes, and the affine describes three: nothing to reorder
        raise UnsupportedInput(where, f"cannot read the MINC dimension names of this {len(img.shape)}D image, "
                                      "so which axes are space and which is time is unknown")
    names = [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names]
    space = [i for i, n in enumerate(names) if n.endswith("space")]
    other = [i for i, n in enumerate(names) if not n.endswith("space")]
    if len(space) != 3:
        raise UnsupportedInput(where, f"MINC dimensions ({', '.join(names)}) hold {len(space)} space "
                                      "dimension(s): niconv converts volumes with three (xspace, yspace, zspace)")
    order = tuple(space + other)
    return None if order == tuple(range(len(names))) else order


def format_scale(img, where: str = "") -> Scale | None:
    """The scaling the image's format applies on load, from the header alone; None if unscaled.

    Raises
    ------
    InputError
        For non-finite NIfTI/Analyze scale factors.
    """
    proxy = img.dataobj
    ndim = len(img.shape)
    if isinstance(img, AFNIImage):  # before ArrayProxy: its own factors, not slope/inter
        factors = proxy.scaling
        if factors is None:
            return None
        return Scale(_per_axis(factors, ndim), 0.0, "one factor per volume (AFNI BRICK_FLOAT_FACS)")
    if isinstance(img, PARRECImage):
        factors = img.header.get_data_scaling("dv")  # nib.load's default scaling
        if factors is None:
            return None
        slope, inter = (_per_axis(f, ndim) for f in factors)
        return Scale(slope, inter, "per slice (PAR/REC)")
    if hasattr(proxy, "get_unscaled") and hasattr(proxy, "slope"):  # NIfTI, Analyze/SPM, MGH
        slope, inter = float(proxy.slope), float(proxy.inter)
        if not (np.isfinite(slope) and np.isfinite(inter)):
            raise InputError(where, f"scale factors are not finite (scl_slope={slope}, scl_inter={inter})")
        return None if (slope, inter) == (1.0, 0.0) else Scale(slope, inter, "scl_slope/scl_inter")
    if isinstance(proxy, np.ndarray) or np.dtype(img.get_data_dtype()).kind not in "iu":
        return None  # an array in memory holds the values; MINC does not scale floats
    return Scale(None, None, "image-min/image-max per slice, after clipping to the valid range")


def _per_axis(factors, ndim: int) -> np.ndarray:
    """Scale factors as float64 with ``ndim`` dimensions: leading length-1 axes added."""
    f = np.asarray(factors, dtype=np.float64)
    return f.reshape((1,) * (ndim - f.ndim) + f.shape)


def image_data(img, scaling: str = "float32", where: str = "") -> tuple[np.ndarray, Scale | None]:
    """The voxels of an opened image per the dtype policy: the one way niconv reads values.

    Parameters
    ----------
    img : nibabel.spatialimages.SpatialImage
        As :func:`open_volume` opens it.
    scaling : {"float32", "raw"}
        See the module docstring.
    where : str
        The file name, for messages.

    Returns
    -------
    data : numpy.ndarray
        Shape ``(X, Y, Z[, T, ...])`` (the space axes first, also for MINC,
        see :func:`voxel_axes`), native byte order. Unscaled images: the stored
        values in their stored dtype. Scaled, ``"float32"``: nibabel's values
        (``np.asanyarray(img.dataobj)``, computed in float64) rounded once to
        float32 (complex64 for complex data), computed a block at a time.
        Scaled, ``"raw"``: the stored values.
    scale : Scale or None
        The scaling ``data`` does *not* have applied (``"raw"`` on a scaled
        image; its arrays follow ``data``'s axes), else None.

    Raises
    ------
    UnsupportedInput
        Not a volume with an affine (:func:`check_volume`), a MINC axis order
        that cannot be told, or ``"raw"`` for a format whose scaling is not
        linear (MINC).
    InputError
        Unreadable, truncated or corrupt voxel data, or not enough memory.
    """
    if scaling not in ("float32", "raw"):
        raise ValueError(f"scaling must be 'float32' or 'raw'; found {scaling!r}")
    check_volume(img, where)
    axes = voxel_axes(img, where)
    scale = format_scale(img, where)
    if scale is not None and scaling == "raw" and not scale.linear:
        raise UnsupportedInput(where, f"scaling: raw is not available for {format_name(img)} files, whose values "
                                      f"are not stored * slope + inter ({scale.kind}); use scaling: float32")
    try:
        if scale is None or scaling == "raw":
            data = _native(_stored(img))
        elif scale.linear:
            data, scale = _scaled_float32(_stored(img), scale.slope, scale.inter, where), None
        else:
            data, scale = _float32_blocks(img.dataobj), None
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(where, f"not enough memory to load {fmt_shape(img.shape)} voxels") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(where, codec.corrupt_stream(exc)) from exc
    except Exception as exc:  # format readers raise many types for damaged data
        raise InputError(where, f"cannot read the voxel data: {first_line(exc)}") from exc
    if axes is not None:
        data = data.transpose(axes)
        if scale is not None:
            scale = Scale(*(np.transpose(f, axes) if np.ndim(f) else f for f in (scale.slope, scale.inter)),
                          scale.kind)
    return data, scale


def _stored(img) -> np.ndarray:
    proxy = img.dataobj
    return proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)


def _native(data: np.ndarray) -> np.ndarray:
    if not data.dtype.isnative and data.dtype.fields is None:
        return data.astype(data.dtype.newbyteorder("="))
    return data


def _scaled_float32(stored: np.ndarray, slope, inter, where: str) -> np.ndarray:
    """``stored * slope + inter`` as nibabel computes it (float64, the same operations in the
    same order), rounded once to float32, one block of about 1 MiB at a time."""
    if stored.dtype.fields is not None:
        raise InputError(where, f"colour voxels ({stored.dtype}) with scale factors: a scale applies to numbers")
    wide = np.dtype(np.complex128 if stored.dtype.kind == "c" else np.float64)
    out = np.empty_like(stored, dtype=np.complex64 if wide.kind == "c" else np.float32, subok=False)
    # nibabel multiplies only by a slope other than 1 and adds only an intercept other than 0;
    # array factors (per volume, per slice) are always applied
    multiply = np.ndim(slope) > 0 or slope != 1.0
    add = np.ndim(inter) > 0 or inter != 0.0
    arrays = [f for f in (slope, inter) if np.ndim(f) > 0]
    it = np.nditer([stored, out, *arrays], flags=["external_loop", "buffered", "zerosize_ok"],
                   op_flags=[["readonly"], ["writeonly"]] + [["readonly"]] * len(arrays),
                   op_dtypes=[wide] * (2 + len(arrays)), casting="same_kind",
                   buffersize=_BLOCK_BYTES // wide.itemsize)
    with it:
        for x, o, *factors in it:
            a = factors.pop(0) if np.ndim(slope) > 0 else slope
            b = factors.pop(0) if np.ndim(inter) > 0 else inter
            if multiply:
                np.multiply(x, a, out=o)
            else:
                o[...] = x
            if add:
                np.add(o, b, out=o)
    return out


def _float32_blocks(proxy) -> np.ndarray:
    """nibabel's own values, float64 a block of leading-axis slices at a time, rounded to float32."""
    shape = tuple(int(s) for s in proxy.shape)
    out = np.empty(shape, dtype=np.float32)
    step = max(1, _BLOCK_BYTES // max(8 * math.prod(shape[1:]), 1))
    for start in range(0, shape[0] if shape else 0, step):
        out[start:start + step] = proxy[start:start + step]
    return out


def _any_finite(data: np.ndarray, block: int = 1 << 20) -> bool:
    """True if any value is finite; stops at the first block that has one (usually the first)."""
    flat = data.ravel(order="K")  # a view for the contiguous arrays nibabel returns
    for start in range(0, flat.size, block):
        if np.isfinite(flat[start:start + block]).any():
            return True
    return False


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
        if low.endswith(nifti.SUFFIXES):
            offset, shape, dtype = nifti.nifti_extent(codec.file_prefix(path, 540), str(path))
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
    """Reject headers that claim more voxel data than the file can hold, before allocating it
    (:func:`niconv.nifti.check_claim`); a ``.nii.gz`` whose gzip trailer says it holds less."""
    try:
        shape, dtype = tuple(int(s) for s in img.shape), np.dtype(img.get_data_dtype())
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
    if low.endswith((".gz", ".mgz", ".nii", ".img")):
        nifti.check_claim(str(p), shape, dtype, offset, size, compressed=not low.endswith((".nii", ".img")))
    if low.endswith(".nii.gz"):
        isize = codec.gzip_size(image_file)
        expected = offset + math.prod(shape) * dtype.itemsize
        if isize is not None and isize < expected % 2**32:
            raise InputError(str(p), f"file is truncated: header says {expected} bytes "
                                     f"uncompressed, the gzip stream holds {isize}")


def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


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
    name = None
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
        dtype = _npy_header_dtype(p, name)
        if dtype is not None and dtype.hasobject:
            member = f"array '{name}'" if name else "array"
            raise InputError(str(p), f"the {member} holds Python objects (dtype {dtype}), not numbers; niconv "
                                     "never unpickles a file (allow_pickle=False): save a numeric array") from exc
        raise InputError(str(p), f"not a readable NumPy file ({first_line(exc)})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise InputError(str(p), f"not a readable NumPy file ({type(exc).__name__}: {first_line(exc)})") from exc


def _npy_header_dtype(path: Path, member: str | None = None) -> np.dtype | None:
    """The dtype a ``.npy`` (or an ``.npz``'s ``member``) declares in its header; None if unreadable.

    Reads the header text only (a literal, never unpickled), to word a refusal.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) if member else open(path, "rb") as holder:
            with holder.open(member + ".npy") if member else holder as f:
                return npy_header(f)[1]
    except Exception:  # noqa: BLE001 - only for the wording of an error already being raised
        return None


def npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of the ``.npy`` open at ``f`` (a literal, never unpickled;
    the data is not read).

    Raises
    ------
    ValueError
        If it is not a ``.npy`` header of a format version niconv reads (1.0, 2.0).
    """
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]}, which niconv does not read")
    shape, _fortran, dtype = read(f)
    return shape, np.dtype(dtype)
