"""The single-file NIfTI-1/2 format (``.nii``, ``.nii.gz``): its header, what it claims, its voxels.

:func:`open_nifti` reads such a file in one pass: the file is read once (a
``.nii.gz`` inflated in one libdeflate call), the header parsed once by
nibabel's own header class, and the voxels are a view of the bytes read. What
a header claims is checked against the file before anything is allocated
(:func:`check_claim`), with the words nibabel's route uses for the other
formats, so a damaged file is reported the same whichever route read it.
"""
from __future__ import annotations

import io
import math
import os
import re
import struct

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import native_code

from . import codec
from .errors import InputError
from .text import first_line, fmt_bytes, fmt_dtype, fmt_shape

#: File name endings (lower case) of single-file NIfTI images.
SUFFIXES = (".nii", ".nii.gz")
_SNIFF_BYTES = 540  # the larger fixed header (NIfTI-2)


class NotNifti(InputError):
    """A file whose bytes are not a single-file NIfTI-1/2 image (not what its name promises)."""


def nifti_class(prefix, where: str = ""):
    """The nibabel image class of a NIfTI file from its first bytes, as ``nib.load`` tells it.

    ``nib.load`` takes a ``.nii`` as NIfTI-1 when its magic is ``n+1``/``ni1``,
    else as NIfTI-2 when its header size is 540; the same rule here, by
    nibabel's own test (``may_contain_header``).

    Raises
    ------
    NotNifti
        If the bytes are neither (too short for a header, or no NIfTI header).
    """
    block = bytes(prefix[:_SNIFF_BYTES])
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        if klass.header_class.may_contain_header(block):
            return klass
    raise NotNifti(where, "not a NIfTI-1 or NIfTI-2 file (no NIfTI header in its first bytes)")


def nifti_extent(prefix, where: str = "") -> tuple[int, tuple[int, ...], np.dtype]:
    """Where a NIfTI file's voxels start, their shape and dtype, from the file's first bytes.

    For planning: the header is not checked or fixed (see :func:`read_header`).

    Parameters
    ----------
    prefix : bytes-like
        The first uncompressed bytes of the file: at least the fixed header
        (348 bytes for NIfTI-1, 540 for NIfTI-2).
    where : str
        The file name, for error messages.

    Returns
    -------
    offset : int
        Byte offset of the voxel data (``vox_offset``, at least the header's end).
    shape : tuple of int
        The dimensions the header gives, as Python integers (their product
        cannot wrap around, whatever a corrupt header says).
    dtype : numpy.dtype
        The stored dtype, in the file's byte order.

    Raises
    ------
    InputError
        If the bytes are not a NIfTI-1/2 header, or give a negative dimension
        or an unknown data type.
    """
    hdr_class = nifti_class(prefix, where).header_class
    fixed = hdr_class.sizeof_hdr
    try:
        header = hdr_class(bytes(prefix[:fixed]), check=False)
        shape, dtype = _shape_dtype(header, where)
    except InputError:
        raise
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise InputError(where, header_problem(exc) or f"invalid header: {first_line(exc)}") from exc
    return max(header.get_data_offset(), fixed + 4), shape, dtype


def read_header(klass, prefix, where: str = ""):
    """The fixed header of a NIfTI file, parsed and checked as ``nib.load`` does (``check=True``:
    fixable problems fixed, others refused); its extensions are read by :func:`open_nifti`.

    Raises
    ------
    InputError
        If nibabel refuses the header, in :func:`header_problem`'s words.
    """
    try:
        return klass.header_class(bytes(prefix[:klass.header_class.sizeof_hdr]), check=True)
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise InputError(where, _header_words(exc)) from exc


def header_problem(exc: BaseException) -> str | None:
    """Plain words for nibabel refusing a header, or None if ``exc`` is not about the header."""
    text = first_line(exc)
    m = re.search(r"data code (\S+) not (recognized|supported)", text)
    if m:
        return f"unsupported data type code {m.group(1)} in the header (not a voxel type niconv can read)"
    m = re.search(r"invalid intercept (\S+)", text)
    if m:
        return (f"the scale factor scl_inter in the header is {m.group(1)}, not a finite number, "
                "so the voxel values cannot be computed (damaged header)")
    if isinstance(exc, (HeaderDataError, ValueError, KeyError, struct.error)):
        return f"invalid header: {text}"
    return None


def _header_words(exc: BaseException) -> str:
    return header_problem(exc) or f"cannot read the image header: {first_line(exc)}"


def check_claim(where: str, shape, dtype, offset: int, file_size: int, compressed: bool) -> None:
    """Refuse a header that claims more voxel data than its file can hold, before allocating it.

    For NIfTI and the formats stored like it (Analyze ``.img``, MGH ``.mgz``).

    Parameters
    ----------
    where : str
        The file, for messages.
    shape, dtype
        The voxel array the header describes.
    offset : int
        Where the voxels start in the (uncompressed) data file.
    file_size : int
        Bytes of the data file on disk.
    compressed : bool
        The data file is gzip-compressed: only a claim beyond what deflate can
        expand the file to is refused here (the reader finds a short stream).

    Raises
    ------
    InputError
        If the claim cannot be true: the header is corrupt, or the file truncated.
    """
    # Python integers: a corrupt header's dimensions must not overflow int64 into a small number
    nbytes = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    claim = f"{fmt_shape(shape)} voxels of {fmt_dtype(dtype)} ({fmt_bytes(nbytes)})"
    if compressed:
        if nbytes > file_size * codec.MAX_DEFLATE_RATIO:
            raise InputError(where, f"the header claims {claim} but the compressed file has only "
                                    f"{fmt_bytes(file_size)}, more than compression can explain: the header is corrupt")
        return
    if offset > file_size:
        raise InputError(where, f"vox_offset {offset} points past the end of the file ({file_size} bytes): "
                                "the header is corrupt")
    if nbytes > 1000 * max(file_size, 1):
        raise InputError(where, f"the header claims {claim} but the file has only {fmt_bytes(file_size)}: "
                                "the header is corrupt")
    if offset + nbytes > file_size:
        raise InputError(where, f"file is truncated: the header says {claim} from byte {offset}, "
                                f"the file holds only {file_size - offset} bytes of voxel data")


def check_scale_factors(slope: float, inter: float, where: str) -> None:
    """Refuse non-finite NIfTI scale factors, which nibabel silently reads as 'no scaling'.

    ``slope`` and ``inter`` are the header's raw ``scl_slope`` and ``scl_inter``.
    A NaN or infinite ``scl_slope`` means the header is damaged: the intended
    scaling is unknown, so converting the stored integers would give wrong
    values without a word. ``scl_slope == 0`` is the NIfTI-1 standard's "no
    scaling", and both factors NaN is how nibabel marks an unscaled header, so
    both pass.

    Raises
    ------
    InputError
        If ``scl_slope`` is not finite, or ``scl_inter`` is not finite while
        ``scl_slope`` is set.
    """
    if np.isnan(slope) and np.isnan(inter):
        return
    if not np.isfinite(slope):
        raise InputError(where, f"the scale factor scl_slope in the header is {slope}, not a finite number, "
                                "so the voxel values cannot be computed (damaged header)")
    if slope != 0 and not np.isfinite(inter):
        raise InputError(where, f"the scale factor scl_inter in the header is {inter}, not a finite number, "
                                "so the voxel values cannot be computed (damaged header)")


class StoredVoxels:
    """nibabel's array proxy interface over stored voxels already in memory.

    The ``dataobj`` of an image opened by :func:`open_nifti`: like nibabel's
    ``ArrayProxy`` it has ``shape``, ``dtype``, ``slope``, ``inter`` and
    ``get_unscaled()`` (the stored array itself, no copy), and reading it as an
    array (``np.asanyarray(image.dataobj)``) gives nibabel's scaled values.
    """

    is_proxy = True

    def __init__(self, stored: np.ndarray, slope: float, inter: float):
        self._stored = stored
        self.slope = slope
        self.inter = inter

    @property
    def shape(self) -> tuple[int, ...]:
        return self._stored.shape

    @property
    def ndim(self) -> int:
        return self._stored.ndim

    @property
    def dtype(self) -> np.dtype:
        return self._stored.dtype

    def get_unscaled(self) -> np.ndarray:
        """The stored values, shape ``(X, Y, Z[, T, ...])``, Fortran order, native byte order."""
        return self._stored

    def __array__(self, dtype=None, copy=None):
        values = self._scaled(self._stored)
        return values if dtype is None else values.astype(dtype, copy=False)

    def __getitem__(self, key):
        return self._scaled(self._stored[key])

    def _scaled(self, stored: np.ndarray) -> np.ndarray:
        from nibabel.volumeutils import apply_read_scaling

        return apply_read_scaling(stored, self.slope, self.inter)  # unscaled: ``stored`` itself


def open_nifti(path):
    """Open a single-file NIfTI-1/2 image in one pass: one read, one header parse, no ``nib.load``.

    Parameters
    ----------
    path : str or path-like
        A ``.nii`` or a ``.nii.gz`` (gzip-compressed when its name ends in
        ``.gz``, any case).

    Returns
    -------
    nibabel.Nifti1Image or nibabel.Nifti2Image
        Header, extensions and affine as ``nib.load`` gives them. Its
        ``dataobj`` is a :class:`StoredVoxels` over the file's bytes (the
        stored values are a view of the inflated ``.nii.gz``, or of a ``.nii``
        mapped into memory copy-on-write; big-endian values are byte-swapped in
        place) with the header's scale factors; :func:`niconv.volume.image_data`
        turns it into values as for any other image.

    Raises
    ------
    NotNifti
        If the bytes are not what the name promises: a ``.nii.gz`` that is not
        gzip, a ``.nii`` that is, or no NIfTI header.
    InputError
        If the file cannot be read, its header is refused, claims more than
        the file holds (:func:`check_claim`), has non-finite scale factors,
        or the data is truncated or corrupt.
    OverlongStream
        If a ``.nii.gz`` stream goes on more than
        :data:`niconv.codec.TRAILING_SLACK` bytes past the image its header
        describes (nothing more is inflated).
    """
    where = os.fspath(path)
    compressed = str(where).lower().endswith(".gz")
    try:
        f = open(where, "rb")
    except FileNotFoundError as exc:
        raise InputError(where, "file not found") from exc
    except OSError as exc:
        raise InputError(where, f"cannot read: {first_line(exc)}") from exc
    with f:
        try:
            if compressed:
                comp = f.read()
                file_size = len(comp)
                if not codec.is_gzip(comp):
                    raise NotNifti(where, "not gzip-compressed, as a name ending in .gz says")
                prefix = codec.gz_prefix(comp, _SNIFF_BYTES, where)
            else:
                file_size = os.fstat(f.fileno()).st_size
                prefix = f.read(_SNIFF_BYTES)
                if codec.is_gzip(prefix):
                    raise NotNifti(where, "gzip-compressed, but its name does not end in .gz")
            klass = nifti_class(prefix, where)
            header = read_header(klass, prefix, where)
            shape, dtype = _shape_dtype(header, where)
            offset = header.get_data_offset()
            check_claim(where, shape, dtype, offset, file_size, compressed)
            check_scale_factors(float(header["scl_slope"]), float(header["scl_inter"]), where)
            size = offset + math.prod(shape) * dtype.itemsize
            if compressed:
                raw = codec.inflate(comp, where, size)
                del comp
            else:
                # mapped, not read: like nib.load's memory map, the voxels cost no memory until used;
                # copy-on-write, so big-endian values are swapped in place on private pages
                raw = np.memmap(f, dtype=np.uint8, mode="c", shape=(size,))
        except OSError as exc:
            raise InputError(where, f"cannot read: {first_line(exc)}") from exc
    return _image(klass, header, raw, shape, dtype, where, compressed)


def _shape_dtype(header, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
    except Exception as exc:  # an unknown data type code, a damaged dim field
        raise InputError(where, _header_words(exc)) from exc
    if any(n < 0 for n in shape):
        raise InputError(where, f"invalid header: negative dimension in {shape}")
    return shape, dtype


def _image(klass, header, raw, shape: tuple[int, ...], dtype: np.dtype, where: str, compressed: bool):
    """The image over ``raw`` (the file's bytes from its start, a bytearray or a memory map): extensions,
    voxels, scale factors."""
    offset = header.get_data_offset()
    count = math.prod(shape)
    size = offset + count * dtype.itemsize
    if len(raw) < size:
        held = "the gzip stream holds" if compressed else "the file holds"
        raise InputError(where, f"file is truncated: header says {size} bytes{' uncompressed' if compressed else ''}, "
                                f"{held} {len(raw)}")
    try:
        _read_extensions(header, raw)
        slope, inter = header.get_slope_inter()
    except Exception as exc:  # nibabel raises several types for damaged extensions or factors
        raise InputError(where, _header_words(exc)) from exc
    # nibabel's rule: an unset (0 / NaN) slope means no scaling
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    stored = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    if not dtype.isnative and dtype.fields is None:
        stored.byteswap(inplace=True)  # in place: no second copy for big-endian files
        stored = stored.view(dtype.newbyteorder("="))
    stored = stored.reshape(shape, order="F")
    try:
        # the constructor keeps the header as is when the affine matches its best affine,
        # and resets scl_slope/scl_inter as nib.load does (the proxy keeps them)
        return klass(StoredVoxels(stored, slope, inter), header.get_best_affine(), header)
    except Exception as exc:  # nibabel raises several types for a header it cannot make an image of
        raise InputError(where, _header_words(exc)) from exc


def _read_extensions(header, raw) -> None:
    """The header extensions, read as nibabel's ``from_fileobj`` reads them after the fixed header:
    a 4-byte flag, then extensions up to ``vox_offset``."""
    fixed = header.sizeof_hdr
    flag = raw[fixed:fixed + 4]
    if len(flag) < 4 or flag[0] == 0:
        return
    end = header.get_data_offset()
    stream = io.BytesIO(bytes(raw[fixed + 4:max(end, fixed + 4)]))  # a small copy: the voxels stay in raw
    header.extensions = header.exts_klass.from_fileobj(stream, end - fixed - 4, header.endianness != native_code)
