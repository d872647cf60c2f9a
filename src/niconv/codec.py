"""Fast, deterministic deflate for cohort outputs and inputs.

Almost all the time of a ``numpy`` or ``nifti`` conversion goes to deflate, so
this module routes it through the fastest well-kept libraries and keeps the
outputs standard:

* writing: ISA-L (:mod:`isal`) deflates ``.npz`` members and ``.nii.gz``
  streams, several times faster than the standard library's zlib at a size
  within a few percent of ``np.savez_compressed``'s;
* reading: libdeflate (:mod:`deflate`) inflates a whole ``.gz`` in one call
  into one buffer, so the voxel array is a view of it (no second copy).

Outputs depend only on the data and the level: zip entries carry a fixed
timestamp, the gzip header has mtime 0 and no file name.

Compression levels run from 0 (fastest) to 9 (smallest), as in zlib. Levels
0-3 are ISA-L's own four levels (fast); 4-9 use the standard library's zlib
at that level (several times slower, for the smallest files: ISA-L's best
level is not always smaller than its level 2). Without :mod:`isal` (or
:mod:`deflate`) the standard library is used instead, with one
``RuntimeWarning``.
"""
from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import warnings
import zipfile
import zlib
from typing import Mapping

import numpy as np

from .errors import InputError, NiconvError, OutputError
from .text import first_line

try:
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a declared dependency
    _igzip = None
    _isal = None
try:
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - deflate is a declared dependency
    _libdeflate = None

__all__ = [
    "DEFAULT_LEVEL",
    "write_npy",
    "write_npz",
    "write_nifti_gz",
    "inflate",
    "gz_prefix",
    "file_prefix",
    "gzip_size",
]

#: Default deflate level: ISA-L's level 2. On real MRI volumes (uint8 and int16)
#: its files are 0.98-1.035x the size of ``np.savez_compressed``'s (zlib level 6)
#: at 16-24x the speed; level 3 is slower and not reliably smaller. See
#: ``benchmarks/README.md``.
DEFAULT_LEVEL = 2
_ISAL_MAX_LEVEL = 3  # ISA-L has levels 0-3; above, the caller asked for size over speed

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
_UNIX = 3  # ZipInfo.create_system; the default depends on the OS writing the file
# zipfile switches to zip64 records above this size (2 GiB - 1, not 4 GiB: it
# treats sizes as signed); members that may exceed it must be opened with force_zip64.
_ZIP64_THRESHOLD = (1 << 31) - 1
_CHUNK = 4 << 20  # bytes handed to the compressor per call: bounds the temporary output
#: Deflate cannot compress better than about 1032:1: a header claiming more is corrupt,
#: and must not make us allocate its claim.
MAX_DEFLATE_RATIO = 1100
#: Bytes a gzip stream may hold beyond the image its header describes (padding some
#: writers add). A stream that goes on longer is refused after inflating this much more.
TRAILING_SLACK = 1 << 20
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no flags, mtime 0, OS unknown

# Set to False to force the public zipfile API (the fallback path) for .npz members.
_FAST_ZIP = True
_warned: set[str] = set()


class OverlongStream(InputError):
    """A gzip stream that goes on past the image its header describes (a decompression bomb,
    or dimensions too small): refused without inflating the rest."""


# ---------------------------------------------------------------------------------------------
# levels and backends


def _resolve_level(level: int | None, where: str) -> int:
    if level is None:
        return DEFAULT_LEVEL
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= int(level) <= 9:
        raise OutputError(where, f"compression level must be an integer from 0 to 9; found {level!r}")
    return int(level)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _compressobj(level: int):
    """A raw-deflate compressor (no zlib/gzip container)."""
    if level > _ISAL_MAX_LEVEL:
        return zlib.compressobj(level, zlib.DEFLATED, -15)
    if _isal is not None:
        return _isal.compressobj(level, _isal.DEFLATED, -15)
    _warn_once("isal", "niconv: the 'isal' package is missing; deflating with the standard library's zlib (slower)")
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def _crc32(data, value: int = 0) -> int:
    if _libdeflate is not None:
        return _libdeflate.crc32(data, value)
    if _isal is not None:
        return _isal.crc32(data, value)
    return zlib.crc32(data, value)


# ---------------------------------------------------------------------------------------------
# .npz


def write_npy(path, arr: np.ndarray) -> None:
    """Write one array as ``.npy`` (``np.load`` reads it); Fortran order kept without a copy."""
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def write_npz(path, arrays: Mapping[str, np.ndarray], compressed: bool = True, level: int | None = None) -> None:
    """Write ``arrays`` as an ``.npz``: a zip of ``.npy`` members that ``np.load`` reads.

    Each member ``<key>.npy`` holds exactly the bytes ``np.save`` would write
    (Fortran-ordered arrays keep ``fortran_order: True`` and are written from
    their own memory, without a transposed copy). Members are deflated with
    ISA-L, streamed in 4 MiB pieces, so no compressed copy of a whole array is
    held in memory. Zip entries carry a fixed timestamp and Unix attributes:
    the bytes depend only on the arrays, ``compressed`` and ``level``.

    Parameters
    ----------
    path : str, path-like or writable binary file
        Output file. It is overwritten; callers wanting atomic replacement
        write to a temporary name first (:func:`niconv.writers.atomic_output`).
    arrays : mapping of str to array-like
        Member name (without ``.npy``) to array, any shape, any non-object
        dtype, written in the mapping's order. Plain ``ndarray`` semantics:
        subclasses are stored as their base array (a mask is not stored).
    compressed : bool
        True: deflated members; False: stored (uncompressed) members.
    level : int or None
        Deflate level, 0 (fastest) to 9 (smallest); None uses
        :data:`DEFAULT_LEVEL`. 0-3: ISA-L; 4-9: the standard library's zlib.

    Raises
    ------
    OutputError
        If the file cannot be written (folder missing or read-only, disk full),
        a key is not a string, an array holds Python objects, or ``level`` is
        out of range. A partially written file at ``path`` is removed.

    Notes
    -----
    Members over 2 GiB get zip64 records, which ``np.load`` reads. Without the
    ``isal`` package, or if this Python's :mod:`zipfile` no longer has the
    internal compressor hook used here, the standard library's zlib deflates
    at the same ``level`` (slower, slightly smaller files) and a
    ``RuntimeWarning`` says so once.
    """
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "<file>")
    where = str(where)
    lvl = _resolve_level(level, where)
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    members = []
    for key, arr in arrays.items():
        if not isinstance(key, str) or not key:
            raise OutputError(where, f".npz member names must be non-empty strings; found {key!r}")
        arr = np.asarray(arr)
        if arr.dtype.hasobject:
            raise OutputError(where, f"array '{key}' holds Python objects ({arr.dtype}), which .npz cannot "
                                     "store without pickle")
        members.append((key, arr))
    try:
        with zipfile.ZipFile(path, "w", compression=method, allowZip64=True) as zf:
            for key, arr in members:
                _write_member(zf, key, arr, method, lvl)
    except NiconvError:
        _remove_partial(path)
        raise
    except (OSError, ValueError, RuntimeError, struct.error, zlib.error) as exc:
        _remove_partial(path)
        raise OutputError(where, f"cannot write .npz: {first_line(exc)}") from exc


def _write_member(zf: zipfile.ZipFile, key: str, arr: np.ndarray, method: int, level: int) -> None:
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
    info.compress_type = method
    info.create_system = _UNIX
    info.external_attr = 0o644 << 16
    _set_zip_level(info, level)
    header, fortran = _npy_header(arr)
    # zipfile's own rule (size * 1.05 > limit) leaves room for incompressible data
    zip64 = (len(header) + arr.nbytes) * 1.05 > _ZIP64_THRESHOLD
    with zf.open(info, "w", force_zip64=zip64) as out:
        if method == zipfile.ZIP_DEFLATED and level <= _ISAL_MAX_LEVEL:
            _use_fast_deflate(out, level)
        out.write(header)
        for piece in _array_pieces(arr, fortran):
            out.write(piece)


def _set_zip_level(info: zipfile.ZipInfo, level: int) -> None:
    # ZipFile.open(ZipInfo, "w") takes the level from the ZipInfo: a public attribute
    # since Python 3.13, a private one before. Only the fallback path uses it.
    for name in ("compress_level", "_compresslevel"):
        try:
            setattr(info, name, level)
            return
        except AttributeError:
            continue


def _use_fast_deflate(stream, level: int) -> bool:
    """Swap the zlib compressor of a fresh ``ZipFile.open(..., "w")`` stream for ISA-L's.

    zipfile has no public hook for another deflate implementation, but its
    write stream keeps the compressor in ``_compressor`` and calls only
    ``compress`` and ``flush`` on it, which ISA-L's compressor also provides.
    If that attribute is missing or unexpected, or isal is not installed, the
    stream keeps the standard library's compressor (same format, slower).
    """
    if _isal is None:
        _warn_once("isal", "niconv: the 'isal' package is missing; deflating with the standard library's zlib (slower)")
        return False
    current = getattr(stream, "_compressor", None)
    if (not _FAST_ZIP or current is None or getattr(stream, "_file_size", None) != 0
            or not (hasattr(current, "compress") and hasattr(current, "flush"))):
        _warn_once("zipfile", "niconv: this Python's zipfile has no known compressor hook; .npz members are "
                              "deflated with the standard library's zlib (slower)")
        return False
    stream._compressor = _isal.compressobj(level, _isal.DEFLATED, -15)
    return True


def _npy_header(arr: np.ndarray) -> tuple[bytes, bool]:
    """The ``.npy`` header ``np.save`` writes for ``arr``, and whether it is Fortran order."""
    fmt = np.lib.format
    d = fmt.header_data_from_array_1_0(arr)
    buf = io.BytesIO()
    # np.save picks the oldest format version the header fits in; do the same so the
    # member bytes equal np.save's (version 3.0 only for non-latin-1 field names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Stored array in format 2.0/3.0"
        for writer in (fmt.write_array_header_1_0, fmt.write_array_header_2_0, _write_header_3_0):
            buf.seek(0)
            buf.truncate()
            try:
                writer(buf, d)
                break
            except (ValueError, UnicodeEncodeError):
                continue
    return buf.getvalue(), bool(d["fortran_order"])


def _write_header_3_0(fp, d) -> None:
    np.lib.format._write_array_header(fp, d, (3, 0))  # no public writer for version 3.0


def _array_pieces(arr: np.ndarray, fortran: bool):
    """The array's bytes in ``.npy`` order, as memoryviews of its own memory where possible."""
    if arr.size == 0:
        return
    if fortran:
        flat = arr.T  # C-contiguous view of the same memory: the .npy bytes, no copy
    elif arr.flags.c_contiguous:
        flat = arr
    else:
        # neither C nor Fortran contiguous (a strided view): copy a piece at a time
        step = max(_CHUNK // arr.itemsize, 1)
        for piece in np.nditer(arr, flags=["external_loop", "buffered", "zerosize_ok"],
                               buffersize=step, order="C"):
            yield piece.tobytes("C")
        return
    view = memoryview(flat.reshape(-1).view(np.uint8))
    for start in range(0, view.nbytes, _CHUNK):
        yield view[start:start + _CHUNK]


def _remove_partial(path) -> None:
    if isinstance(path, (str, os.PathLike)):
        try:
            os.unlink(path)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# .nii.gz writing


class _GzipSink(io.RawIOBase):
    """A write-only gzip stream: fixed header (mtime 0, no name), raw deflate, CRC-32 + size trailer.

    Forward seeks are refused so nibabel pads with zeros instead; ``tell`` is the
    uncompressed position, as nibabel expects.
    """

    def __init__(self, raw, level: int):
        super().__init__()
        self._raw = raw
        self._compressor = _compressobj(level)
        self._crc = 0
        self._size = 0
        raw.write(_GZIP_HEADER)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        for start in range(0, n, _CHUNK):
            piece = view[start:start + _CHUNK]
            self._crc = _crc32(piece, self._crc)
            out = self._compressor.compress(piece)
            if out:
                self._raw.write(out)
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET and offset == self._size or whence == io.SEEK_CUR and offset == 0:
            return self._size
        raise io.UnsupportedOperation("a gzip output stream cannot seek")

    def finish(self) -> None:
        """Flush the compressor and write the gzip trailer."""
        self._raw.write(self._compressor.flush())
        self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))


def write_nifti_gz(image, path, level: int | None = None) -> None:
    """Write a single-file nibabel image as ``.nii.gz`` (or ``.nii``), deterministically.

    The image is serialised by nibabel itself (``to_file_map``: header,
    extensions, data with nibabel's casting and scaling rules, written a slice
    at a time) into a gzip stream deflated by ISA-L with mtime 0 and no file
    name, so the same image gives the same bytes and ``nib.load`` reads it.

    Parameters
    ----------
    image : nibabel single-file image
        Usually :class:`nibabel.Nifti1Image` or :class:`nibabel.Nifti2Image`
        (any image stored in one file, e.g. MGH, works the same way).
        It is not modified (its ``file_map`` is restored afterwards).
    path : str or path-like
        Output file, overwritten. A name ending in ``.gz`` (any case) is
        gzip-compressed; any other name (``.nii``) is written uncompressed.
    level : int or None
        Deflate level, 0 (fastest) to 9 (smallest); None uses
        :data:`DEFAULT_LEVEL`. 0-3: ISA-L; 4-9: the standard library's zlib.

    Raises
    ------
    OutputError
        If ``image`` is not a single-file nibabel image, nibabel cannot
        serialise it, the file cannot be written, or ``level`` is out of range.
        A partially written file at ``path`` is removed.
    """
    where = os.fspath(path)
    lvl = _resolve_level(level, where)
    files_types = getattr(image, "files_types", None)
    if not files_types or len(files_types) != 1 or not hasattr(image, "to_file_map"):
        raise OutputError(where, f"expected a single-file nibabel image (e.g. Nifti1Image); "
                                 f"found {type(image).__name__}")
    from nibabel.fileholders import FileHolder

    gz = str(where).lower().endswith(".gz")
    saved = image.file_map
    try:
        with open(where, "wb") as raw:
            sink = _GzipSink(raw, lvl) if gz else raw
            try:
                image.to_file_map({files_types[0][0]: FileHolder(fileobj=sink)})
            finally:
                image.file_map = saved  # to_file_map points the image at our stream
            if gz:
                sink.finish()
    except NiconvError:
        _remove_partial(where)
        raise
    except OSError as exc:
        _remove_partial(where)
        raise OutputError(where, f"cannot write image: {first_line(exc)}") from exc
    except Exception as exc:  # nibabel raises many types for data it cannot store
        _remove_partial(where)
        raise OutputError(where, f"nibabel cannot write this image ({type(exc).__name__}: "
                                 f"{first_line(exc)})") from exc


# ---------------------------------------------------------------------------------------------
# .gz reading


def inflate(comp, where: str, size: int | None = None) -> bytearray:
    """Inflate gzip data (a whole ``.gz`` file's bytes) into one writable buffer.

    The usual path is one libdeflate call into a buffer of exactly the size
    the gzip trailer announces (ISIZE), about 1.5-2x faster than Python's
    gzip module and with no intermediate copies, so ``np.frombuffer`` on the
    result gives a writable array that owns no second copy. Streams libdeflate
    cannot take in one call (several gzip members, 4 GiB or more, a trailer
    that does not match) are inflated incrementally into a preallocated buffer
    (ISA-L, else zlib), so the peak stays one buffer plus 4 MiB.

    Parameters
    ----------
    comp : bytes
        The compressed file, as read (``.nii.gz``, ``.mgz``, ...).
    where : str
        The file name, for error messages.
    size : int, optional
        The bytes the caller needs, as the file's own header describes them
        (e.g. NIfTI ``vox_offset`` + voxel bytes). At most this many are
        returned, and at most :data:`TRAILING_SLACK` more are inflated (and
        dropped): a stream that goes on longer is refused, so a small file that
        inflates to gigabytes (a decompression bomb) costs neither the memory
        nor the time. Without it, the whole stream is returned.

    Returns
    -------
    bytearray
        The uncompressed bytes (all members, concatenated). With ``size``: the
        first ``size`` of them (fewer if the stream is shorter), possibly
        followed by the trailing bytes within the slack.

    Raises
    ------
    InputError
        If the data is not gzip, is truncated or corrupt.
    OverlongStream
        With ``size``, if the stream holds more than ``size`` +
        :data:`TRAILING_SLACK` bytes.
    """
    _check_gzip(comp, where)
    crc, isize = struct.unpack("<II", comp[-8:])
    # a truncated or corrupt file has a garbage "trailer": never allocate more than
    # deflate can possibly expand to
    cap = len(comp) * MAX_DEFLATE_RATIO
    if size is None:
        want, limit = min(isize, cap), None
    else:
        # one call only for a trailer within the bound: libdeflate would inflate (and
        # allocate) whatever a forged trailer announces
        want, limit = min(size, cap), size + TRAILING_SLACK
    # ISIZE is the size modulo 4 GiB; 0 is also what a trailing empty member (bgzip) ends with
    if _libdeflate is not None and 0 < isize <= cap and (limit is None or size <= isize <= limit):
        try:
            out = _libdeflate.gzip_decompress(comp, isize)
        except _libdeflate.DeflateError:
            out = None  # corrupt, larger than ISIZE, or multi-member: the stream path decides
        # libdeflate inflates the first member only and checks it against its own
        # trailer: it is the whole file if it also matches the file's last trailer
        if out is not None and len(out) == isize and _crc32(out) == crc:
            return out
    elif _libdeflate is None:
        _warn_once("deflate", "niconv: the 'deflate' package is missing; inflating with a streaming "
                              "decoder (slower)")
    # preallocate what the caller needs, or a trailer size that is plausible (a truncated
    # file's last bytes are arbitrary); without a size the buffer grows if the stream holds more
    return _inflate_stream(comp, where, want if limit is not None else min(isize, 32 * len(comp)), limit)


def corrupt_stream(exc: BaseException) -> str:
    """The words for compressed data that ends early or does not inflate, with the decoder's reason."""
    return f"file is truncated or its compressed data is corrupt ({first_line(exc)})"


def is_gzip(data) -> bool:
    """True if ``data`` (a file's first bytes, at least 3) starts like a deflate gzip stream."""
    return bytes(data[:3]) == b"\x1f\x8b\x08"


def _check_gzip(comp, where: str) -> None:
    if len(comp) < 18 or not is_gzip(comp):
        raise InputError(where, "not a gzip file (bad magic bytes or too short)")


def _inflate_stream(comp: bytes, where: str, size_hint: int, limit: int | None = None) -> bytearray:
    """Inflate into a buffer of ``size_hint`` bytes; with ``limit``, fill it and refuse a stream
    longer than ``limit`` (the bytes between are inflated and dropped), else grow it to the end."""
    opener = _igzip.IGzipFile if _igzip is not None else gzip.GzipFile
    out = bytearray(size_hint)
    n = 0
    try:
        with opener(fileobj=io.BytesIO(comp), mode="rb") as g:  # BytesIO of bytes shares, not copies
            with memoryview(out) as view:
                while n < len(out):
                    # small pieces: readinto of one huge buffer makes a temporary copy of it
                    got = g.readinto(view[n:n + _CHUNK])
                    if not got:
                        break
                    n += got
            if n < len(out):
                del out[n:]
            elif limit is not None:
                # the image is complete: a few trailing bytes are padding, more is not an image
                while n <= limit:
                    more = g.read(min(_CHUNK, limit - n + 1))
                    if not more:
                        break
                    n += len(more)
                if n > limit:
                    raise OverlongStream(where, _overlong(limit - TRAILING_SLACK, limit))
            else:
                while True:
                    more = g.read(_CHUNK)
                    if not more:
                        break
                    out += more
    except NiconvError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(where, corrupt_stream(exc)) from exc
    except Exception as exc:  # isal raises its own error type for corrupt streams
        if _isal is not None and isinstance(exc, _isal.error):
            raise InputError(where, corrupt_stream(exc)) from exc
        raise
    return out


def _overlong(size: int, limit: int) -> str:
    times = limit / max(size, 1)
    longer = f"more than {times:.0f} times longer" if times >= 2 else f"more than {limit - size} bytes longer"
    return (f"the gzip stream is {longer} than the image its header describes ({size} bytes); niconv stops "
            "inflating it there (a decompression bomb, or a header whose dimensions are wrong)")



def gz_prefix(comp, n: int, where: str = "") -> bytes:
    """The first ``n`` uncompressed bytes of gzip data (fewer if it is shorter), from its first 64 KiB.

    Raises
    ------
    InputError
        If the data is not gzip, or corrupt within those bytes.
    """
    _check_gzip(comp, where)
    out = b""
    data = comp[: 1 << 16]
    while len(out) < n and data:
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(data, n - len(out))
        except zlib.error as exc:
            raise InputError(where, corrupt_stream(exc)) from exc
        if not d.eof:
            break
        data = d.unused_data  # the next gzip member
    return out


def file_prefix(path, n: int) -> bytes:
    """The first ``n`` bytes of a file, inflated if it is gzip-compressed (fewer if it is shorter).

    Reads the file's first 4 KiB (64 KiB when a long gzip file name or comment
    comes first): cheap enough to run on every file of a cohort.

    Raises
    ------
    OSError
        If the file cannot be read.
    InputError
        If it is not a regular file (a named pipe would block), or gzip data is
        corrupt within those bytes.
    """
    where = os.fspath(path)
    fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK)  # opening a named pipe must not wait for a writer
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(where, "not a regular file")
        head = f.read(4096)  # a NIfTI header deflates to well under 1 kB
        if head[:2] != b"\x1f\x8b":
            return head[:n]
        out = gz_prefix(head, n, where)
        if len(out) < n and len(head) == 4096:  # a long gzip file name or comment comes first
            out = gz_prefix(head + f.read((1 << 16) - 4096), n, where)
    return out


def gzip_size(path) -> int | None:
    """The size a gzip file's trailer announces (ISIZE: the uncompressed size modulo 2**32, of
    the last member only), or None if the file cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    except OSError:
        return None
