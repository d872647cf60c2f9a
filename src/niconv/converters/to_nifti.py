"""``nifti``: ``.npy``/``.npz`` -> ``.nii.gz`` with an affine, a reference image's geometry, or identity.

Geometry, first that applies: ``reference`` (affine and header copied);
``affine`` from the config; the ``.npz``'s own ``affine`` member (written by
``to: numpy`` with ``geometry: true`` and by ``to: preprocess``), so a round
trip keeps its place in space; else the identity.

With a reference image, its affine **and header** are copied: qform/sform and
their codes, xyzt_units, pixdim (TR in pixdim[4]), descrip, intent, header
extensions. The array's own dtype is what gets stored (the header's datatype
is set from the array and its scl_slope/scl_inter are cleared), so a float
prediction saved against an int16 reference is not re-quantized.

Dtypes: every NIfTI voxel type is stored as itself, int64 and uint64 included
(NIfTI datatypes 1024 and 1280); bool is stored as uint8 0/1; float16, object
and string arrays are refused with an :class:`~niconv.errors.InputError` naming
the dtype (:func:`nifti_array`). Arrays are read with ``allow_pickle=False``.
An array matching ``input.label_maps`` gets the intent ``NIFTI_INTENT_LABEL``.
Patterns of ``reference`` may be globs (``"{stem}.*"``) or a list, first match
wins (:func:`niconv.converters.check_pair_patterns`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from pydantic import Field, field_validator, model_validator

from .. import codec
from ..paths import resolve_path
from ..schema import ConfigModel, found
from ..errors import InputError
from ..ops.orientation import axcodes
from ..text import fmt_dtype, fmt_shape
from ..volume import image_stem, load_image, read_array
from ..writers import atomic_output
from . import Conversion, Converter, check_pair_patterns, seed_output, show_patterns

class Options(ConfigModel):
    """Options of ``to: nifti``."""

    to: Literal["nifti"] = "nifti"
    affine: Optional[tuple[tuple[float, float, float, float], ...]] = Field(
        None, description="4x4 voxel-to-world (RAS+ mm) affine for every array")
    reference: Optional[Union[str, tuple[str, ...]]] = Field(
        None, description="pattern of each array's reference image, e.g. '{stem}.nii.gz' ({stem}, {name}, {parent}; "
                          "a glob such as '{stem}.*', or a list tried in order)")
    reference_root: Optional[Path] = Field(
        None, description="folder holding the references (mirrored like the input tree); default: beside each array")
    key: Optional[str] = Field(None, description=".npz member to convert; default 'data', else the first")
    compressed: bool = Field(True, description="true: .nii.gz; false: .nii")
    level: Optional[int] = Field(None, ge=0, le=9, description="gzip level; default fast")

    _root = field_validator("reference_root", mode="before")(resolve_path)
    _reference = field_validator("reference")(lambda v: check_pair_patterns(v, placeholder_required=False))

    @field_validator("affine", mode="before")
    @classmethod
    def _affine_shape(cls, v):
        # one message for the whole matrix, not one per missing number
        expected = "expected 4 rows of 4 numbers (a 4x4 affine)"
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in v):
            raise ValueError(f"{expected}, found {found(v)}")
        lengths = sorted({len(row) for row in v})
        if len(v) != 4 or lengths != [4]:
            each = " or ".join(map(str, lengths)) if lengths else "nothing"
            raise ValueError(f"{expected}, found {len(v)} row{'' if len(v) == 1 else 's'} of {each}")
        return v

    @field_validator("affine")
    @classmethod
    def _affine(cls, v):
        if v is None:
            return v
        arr = np.asarray(v, dtype=float)
        if not np.all(np.isfinite(arr)) or not np.allclose(arr[3], [0, 0, 0, 1]):
            raise ValueError("expected finite numbers with last row [0, 0, 0, 1]")
        return v

    @model_validator(mode="after")
    def _one_geometry(self):
        if self.affine is not None and self.reference is not None:
            raise ValueError("give either 'affine' or 'reference', not both")
        return self


def output_name(stem: str, options: Options) -> str:
    return stem + (".nii.gz" if options.compressed else ".nii")


def pairs(options: Options) -> dict:
    if options.reference is None:
        return {}
    return {"reference": (options.reference, options.reference_root)}


def array_to_image(data: np.ndarray, affine=None, reference: str | None = None, where: str = ""):
    """Build a NIfTI image (NIfTI-1; NIfTI-2 when needed) from an array and its geometry.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(X, Y, Z[, T, ...])``; stored with its own dtype (int64 and
        uint64 too), except bool, stored as uint8 0/1 (see :func:`nifti_array`).
    affine : array-like, optional
        ``(4, 4)`` voxel-to-world affine (RAS+ mm). Ignored with ``reference``.
    reference : str, optional
        Image whose affine and header are copied (any format nibabel reads; a
        non-NIfTI header is converted with ``Nifti1Header.from_header``).
    where : str
        The array's path, for error messages.

    Raises
    ------
    InputError
        If ``data`` has fewer than 3 dimensions, no values (a zero in its shape)
        or a dtype NIfTI cannot store (float16, object, strings), or its spatial
        shape ``(X, Y, Z)`` differs from the reference's.
    """
    if data.ndim < 3:
        raise InputError(where, f"expected a volume of shape (X, Y, Z[, T]), found shape {data.shape}")
    if data.size == 0:
        raise InputError(where, f"the array holds no values (shape {fmt_shape(data.shape)}); a NIfTI image needs "
                                "at least one voxel")
    data = nifti_array(data, where)
    if reference is not None:
        ref = load_image(reference)
        ref_shape = tuple(ref.shape[:3])
        if tuple(data.shape[:3]) != ref_shape:
            raise InputError(where, f"spatial shape {tuple(data.shape[:3])} does not match the reference "
                                    f"{reference} spatial shape {ref_shape}")
        klass = _image_class(data.shape, ref.header)
        img = klass(data, ref.affine, header=klass.header_class.from_header(ref.header))
        if isinstance(ref.header, nib.Nifti1Header):
            # keep the reference's own qform/sform and their codes, not just its best affine
            img.set_qform(ref.header.get_qform(), int(ref.header["qform_code"]))
            img.set_sform(ref.header.get_sform(), int(ref.header["sform_code"]))
    else:
        matrix = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        # dtype given: nibabel refuses int64 arrays without it (a warning about other tools)
        img = _image_class(data.shape)(data, matrix, dtype=data.dtype)
        img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(np.nan, np.nan)
    return img


def nifti_array(data: np.ndarray, where: str = "") -> np.ndarray:
    """``data`` as NIfTI stores it: bool as uint8 0/1 (a view), any other dtype NIfTI has as itself.

    NIfTI has (u)int8 to (u)int64, float32/64/128, complex64/128/256 and RGB(A)
    voxel types; int64 is kept as int64 (NIfTI datatype 1024), so niconv's own
    int64 outputs come back unchanged.

    Raises
    ------
    InputError
        For a dtype NIfTI has no voxel type for (float16, object, strings, dates),
        naming the dtype.
    """
    dtype = data.dtype
    if dtype.kind == "b":
        return data.view(np.uint8)
    if dtype.hasobject:
        why = "it holds Python objects, not numbers"
    elif dtype.kind == "f" and dtype.itemsize == 2:
        why = "NIfTI has no half-precision voxel type; cast it to float32 first"
    else:
        try:
            nib.Nifti1Header().set_data_dtype(dtype)
            return data
        except HeaderDataError:
            why = "NIfTI has no voxel type for it"
    raise InputError(where, f"an array of dtype {dtype} cannot be stored in NIfTI: {why} (expected bool, "
                            f"integers, float32/float64, complex or RGB)")


def _image_class(shape, ref_header=None):
    """NIfTI-2 for a NIfTI-2 reference or a dimension over NIfTI-1's int16 limit, else NIfTI-1."""
    if isinstance(ref_header, nib.Nifti2Header) or max(shape) > 32767:
        return nib.Nifti2Image
    return nib.Nifti1Image


def write_nifti(input_path: str, output_file: str, options: Options, reference: str | None = None,
                label_map: bool = False) -> Conversion:
    """Convert one ``.npy``/``.npz`` to ``output_file`` (``.nii.gz`` or ``.nii``), atomically.

    ``label_map`` (the array matches ``input.label_maps``) sets the NIfTI intent
    to ``NIFTI_INTENT_LABEL``, so viewers and ``to: slices`` show its values.

    Raises
    ------
    niconv.volume.MissingInput
        If the array or the reference does not exist (also a ``FileNotFoundError``).
    niconv.errors.InputError
        For an unreadable array, a bad reference, or a shape mismatch (also a ``ValueError``).
    niconv.errors.OutputError
        If the output cannot be written.
    """
    if options.reference is not None and reference is None:
        raise InputError(input_path, f"no reference image matching {show_patterns(options.reference)} was found"
                                     + (f" in {options.reference_root}" if options.reference_root else " beside it"))
    data = np.asanyarray(read_array(input_path, options.key))
    affine = options.affine
    if affine is None and reference is None:
        affine = stored_affine(input_path, options.key)
    img = array_to_image(data, affine, reference, where=input_path)
    if label_map:
        img.header.set_intent("label")
    with atomic_output(output_file) as tmp:
        codec.write_nifti_gz(img, tmp, level=options.level)
    return Conversion(
        outputs=(str(output_file),),
        input_shape=tuple(data.shape),
        input_dtype=fmt_dtype(data.dtype),
        output_shape=tuple(img.shape),
        output_dtype=fmt_dtype(img.get_data_dtype()),
        zooms=tuple(float(z) for z in img.header.get_zooms()),
        axcodes=axcodes(img.affine),
        details={**({"reference": reference} if reference else {}),
                 **({"affine": "from the array file"} if affine is not None and options.affine is None else {}),
                 **({"label_map": True} if label_map else {})},
    )


# the sidecars dcm2niix may write beside a series' image: its JSON; b-values and vectors (diffusion)
SIDECARS = (".json", ".bval", ".bvec")


def output_paths(task) -> tuple[str, ...]:
    """The output; for a DICOM series also every sidecar it may get beside it (:data:`SIDECARS`),
    so that no plan lets one replace a file niconv did not write."""
    if task.series is None:
        return (task.output_path,)
    out = Path(task.output_path)
    stem = out.name[: -len(".nii.gz")] if out.name.lower().endswith(".nii.gz") else out.stem
    return (task.output_path, *(str(out.with_name(stem + suffix)) for suffix in SIDECARS))


def stored_affine(path: str, key: str | None = None) -> np.ndarray | None:
    """The ``(4, 4)`` member ``affine`` of a ``.npz`` (voxel -> RAS+ mm), or None when it has none.

    ``None`` too for a ``.npy`` and when ``key`` names the affine itself.

    Raises
    ------
    InputError
        If the member exists but is not a 4x4 affine (finite, last row ``[0, 0, 0, 1]``).
    """
    if Path(path).suffix.lower() != ".npz" or key == "affine":
        return None
    with np.load(path, allow_pickle=False) as archive:
        if "affine" not in archive.files:
            return None
    affine = np.asarray(read_array(path, "affine"))
    if (affine.shape != (4, 4) or affine.dtype.kind not in "iuf" or not np.all(np.isfinite(affine))
            or not np.allclose(affine[3], [0, 0, 0, 1])):
        raise InputError(path, f"the member 'affine' is not a 4x4 voxel-to-world affine (expected finite numbers "
                               f"with last row [0, 0, 0, 1], found shape {affine.shape}, dtype {affine.dtype}); "
                               f"give 'affine' or 'reference' in the config to override it")
    return affine


def convert(task, options: Options) -> Conversion:
    return write_nifti(task.input_path, task.output_path, options, task.pair("reference"), task.label_map)


def numpy_to_nifti(npy_path, output_path, affine=None, reference_nifti=None, debug=False) -> str:
    """Convert a NumPy array file to a NIfTI-1 image.

    Parameters
    ----------
    npy_path : str or path-like
        ``.npy``, or ``.npz`` (key ``"data"`` when present, else the first
        array); shape ``(X, Y, Z[, T])``.
    output_path : str or path-like
        Output folder (created); the file is ``<output_path>/<PREFIX>.nii.gz``.
    affine : array-like, optional
        ``(4, 4)`` voxel-to-world affine (RAS+ mm).
    reference_nifti : str or path-like, optional
        Image whose affine and header are copied (qform/sform codes,
        xyzt_units, pixdim[4] / TR, descrip survive); overrides ``affine``.
        Neither given: the ``.npz``'s own ``affine`` member when it has one
        (as ``nifti_to_numpy`` and ``to: preprocess`` write it), else identity.
    debug : bool
        Log the written path through the ``niconv`` logger.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    FileNotFoundError
        If ``npy_path`` or ``reference_nifti`` does not exist.
    ValueError
        If the array's spatial shape does not match the reference's, its dtype
        has no NIfTI voxel type (float16, object), or a file is unreadable
        (:class:`niconv.errors.InputError`).

    Notes
    -----
    The array's dtype is stored (int64 as NIfTI int64), except bool: uint8 0/1.
    """
    options = Options(affine=None if affine is None or reference_nifti is not None
                      else tuple(tuple(float(x) for x in row) for row in np.asarray(affine)))
    reference = None if reference_nifti is None else os.fspath(reference_nifti)
    return seed_output(output_path, output_name(image_stem(npy_path), options),
                       lambda out: write_nifti(os.fspath(npy_path), out, options, reference), debug)


CONVERTER = Converter(
    name="nifti",
    options=Options,
    output_name=output_name,
    convert=convert,
    pairs=pairs,
    memory_factor=2.0,
    inputs="array",
    output_paths=output_paths,
)
