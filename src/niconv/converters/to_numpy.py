"""``numpy``: any image nibabel reads -> ``.npz`` (key ``data``) or ``.npy``.

The stored dtype is preserved (``int16`` stays ``int16``; never float64 from
``get_fdata``). Scaled images follow :mod:`niconv.volume`'s dtype policy:
``scaling: float32`` (default) writes nibabel's scaled values rounded to
``float32``; ``scaling: raw`` writes the stored values and, beside them in the
``.npz``, ``scl_slope`` and ``scl_inter`` (float64; value = data * scl_slope +
scl_inter with NumPy broadcasting): scalars for NIfTI/Analyze, arrays of the
data's number of dimensions for AFNI (one slope per volume, ``(1, 1, 1, T)``)
and PAR/REC (per slice, ``(1, 1, Z[, T])``). Scaled MINC files refuse ``raw``.

``geometry: true`` also stores, beside ``data`` in the ``.npz``, ``affine``
(float64 ``(4, 4)``, voxel index of ``data``'s first three axes -> RAS+ mm),
``zooms`` (float64, one voxel size per axis of ``data`` from the header: mm,
then seconds for time) and ``axcodes`` (a string such as ``'LAS'``), so an
array (or a prediction on its voxel grid) can go back to world space without
the original file: ``numpy_to_nifti(pred, out, affine=npz["affine"])``.
"""
from __future__ import annotations

import os
from typing import Literal, Optional

import numpy as np
from pydantic import Field, model_serializer, model_validator

from .. import codec
from ..text import fmt_dtype
from ..schema import ConfigModel
from ..volume import image_stem, read_volume
from ..writers import atomic_output
from . import Conversion, Converter, seed_output

class Options(ConfigModel):
    """Options of ``to: numpy``."""

    to: Literal["numpy"] = "numpy"
    compressed: bool = Field(True, description="true: .npz (deflated zip, key 'data'); false: .npy")
    scaling: Literal["float32", "raw"] = Field(
        "float32", description="scaled images: float32 scaled values, or raw stored values + scl_slope/scl_inter "
                                "(NIfTI, Analyze, AFNI, PAR/REC; not MINC)")
    level: Optional[int] = Field(None, ge=0, le=9, description="deflate level; default: fast, within 5% of np.savez_compressed's size")
    geometry: bool = Field(False, description="also store affine (4x4, voxel -> RAS+ mm), zooms and axcodes "
                                              "in the .npz")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # geometry: false is left out, so the resolved options, and with them the task ids
        # of configs written before the option existed, stay what they were (no redone work)
        data = handler(self)
        if not self.geometry:
            data.pop("geometry", None)
        return data

    @model_validator(mode="after")
    def _extras_need_npz(self):
        if not self.compressed:
            extra = [what for what, on in (("scaling: raw stores scl_slope/scl_inter", self.scaling == "raw"),
                                           ("geometry: true stores affine, zooms and axcodes", self.geometry)) if on]
            if extra:
                raise ValueError(f"{' and '.join(extra)} beside the data, which needs .npz output "
                                 f"(compressed: true; a .npy holds one array); found compressed: false")
        return self


def output_name(stem: str, options: Options) -> str:
    return stem + (".npz" if options.compressed else ".npy")


def write_numpy(input_path: str, output_file: str, options: Options, label_map: bool = False) -> Conversion:
    """Convert one image to ``output_file`` (``.npz`` or ``.npy``), atomically.

    ``label_map`` (the input matches ``input.label_maps``) changes nothing but
    the log's ``details``: the values are stored as they are either way.

    Raises
    ------
    niconv.volume.MissingInput
        If the input does not exist (also a ``FileNotFoundError``).
    niconv.errors.InputError
        If it is not a readable image (also a ``ValueError``).
    niconv.errors.OutputError
        If the output cannot be written.
    """
    vol = read_volume(input_path, scaling=options.scaling)
    data = vol.data
    with atomic_output(output_file) as tmp:
        if options.compressed:
            arrays = {"data": data}
            if vol.scaling is not None:
                arrays["scl_slope"] = np.asarray(vol.scaling.slope, dtype=np.float64)
                arrays["scl_inter"] = np.asarray(vol.scaling.inter, dtype=np.float64)
            if options.geometry:
                arrays["affine"] = vol.affine
                arrays["zooms"] = np.asarray(vol.zooms, dtype=np.float64)
                arrays["axcodes"] = np.asarray(vol.axcodes)
            codec.write_npz(tmp, arrays, compressed=True, level=options.level)
        else:
            codec.write_npy(tmp, data)
    return Conversion(
        outputs=(str(output_file),),
        input_shape=tuple(vol.image.shape),
        input_dtype=fmt_dtype(vol.stored_dtype),
        output_shape=tuple(data.shape),
        output_dtype=fmt_dtype(data.dtype),
        zooms=vol.zooms,
        axcodes=vol.axcodes,
        details={**(_scale_details(vol.scaling) if vol.scaling else {}), **({"label_map": True} if label_map else {})},
    )


def _scale_details(scale) -> dict:
    """The unapplied scale for the log: its factors if single numbers, else what it is and its shape."""
    if np.ndim(scale.slope) == 0 and np.ndim(scale.inter) == 0:
        return {"scl_slope": float(scale.slope), "scl_inter": float(scale.inter)}
    return {"scaling": scale.kind, "scl_shape": list(np.broadcast_shapes(np.shape(scale.slope), np.shape(scale.inter)))}


def convert(task, options: Options) -> Conversion:
    return write_numpy(task.input_path, task.output_path, options, task.label_map)


def nifti_to_numpy(nii_path, output_path, compressed=True, debug=False) -> str:
    """Convert one image (NIfTI or any format nibabel reads) to a NumPy file.

    Parameters
    ----------
    nii_path : str or path-like
        Input image: ``.nii``/``.nii.gz`` (NIfTI-1/2), ``.hdr`` (Analyze), ``.mgz``,
        ``.mnc``, ``.PAR``, ... Voxel array of shape ``(X, Y, Z[, T])``.
    output_path : str or path-like
        Output folder (created). The file is ``<output_path>/<PREFIX>.npz`` or
        ``.npy``, where ``PREFIX`` is the input name without its extensions
        (``scan_001.nii.gz`` -> ``scan_001.npz``).
    compressed : bool
        True: ``.npz`` with the array under key ``"data"``; False: ``.npy``.
    debug : bool
        Log the written path at INFO level through the ``niconv`` logger (global
        logging configuration is not touched).

    Returns
    -------
    str
        The path written.

    Raises
    ------
    FileNotFoundError
        If ``nii_path`` does not exist.
    ValueError
        If it is not a readable image (:class:`niconv.errors.InputError`).

    Notes
    -----
    The stored dtype is preserved; images with scl_slope/scl_inter (or another
    format's scale factors) are written as float32 scaled values, equal to
    nibabel's ``np.asanyarray(img.dataobj)`` rounded to float32.
    """
    options = Options(compressed=bool(compressed))
    return seed_output(output_path, output_name(image_stem(nii_path), options),
                       lambda out: write_numpy(os.fspath(nii_path), out, options), debug)


CONVERTER = Converter(
    name="numpy",
    options=Options,
    output_name=output_name,
    convert=convert,
    memory_factor=1.5,
    inputs="image",
)
