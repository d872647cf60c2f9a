"""``niconv info``: what a user checks before converting an image."""
from __future__ import annotations

import numpy as np

from .volume import format_scale, load_image, voxel_axes


def describe(path: str, header: bool = False) -> str:
    """A readable summary of one image: format, shape, dtypes, zooms with units,
    orientation, qform/sform codes, scaling, and optionally the full header.

    Shape and zooms are in the order niconv gives the voxels (space axes first,
    see :func:`niconv.volume.voxel_axes`).

    Raises
    ------
    niconv.errors.InputError
        If the file is missing, not a readable image, or not a volume.
    """
    img = load_image(path)
    hdr = img.header
    stored = np.dtype(img.get_data_dtype())
    scale = format_scale(img, path)
    order = voxel_axes(img, path)
    axes = order or tuple(range(len(img.shape)))
    if scale:
        loaded = "complex64 (scaled)" if stored.kind == "c" else "float32 (scaled)"
    else:
        loaded = stored.name if stored.fields is None else str(stored)
    try:
        units = hdr.get_xyzt_units()
    except AttributeError:
        units = ("mm", "sec")
    space, time_unit = (units[0] or "unknown"), (units[1] or "unknown")
    zooms = [hdr.get_zooms()[i] for i in axes]
    zoom_text = " x ".join(f"{z:g}" for z in zooms[:3]) + f" {space}"
    if len(zooms) > 3:
        zoom_text += ", " + ", ".join(f"{z:g}" for z in zooms[3:]) + f" {time_unit}"
    import nibabel as nib

    lines = [
        f"{path}",
        f"  format       {type(img).__name__}",
        f"  shape        {tuple(int(img.shape[i]) for i in axes)}"
        + (f" (stored as {tuple(int(n) for n in img.shape)}: space axes moved first)" if order else ""),
        f"  dtype        stored {stored.name if stored.fields is None else stored}, loaded as {loaded}",
        f"  zooms        {zoom_text}",
        f"  orientation  {''.join(c or '?' for c in nib.aff2axcodes(img.affine))}",
    ]
    if isinstance(hdr, nib.Nifti1Header):
        lines.append(f"  qform/sform  qform_code={int(hdr['qform_code'])} sform_code={int(hdr['sform_code'])}")
    lines.append(f"  scaling      {scale or 'none'}")
    lines.append("  affine       " + np.array2string(np.asarray(img.affine), precision=4, suppress_small=True)
                 .replace("\n", "\n               "))
    if header:
        lines.append("  header")
        lines.extend("    " + ln for ln in str(hdr).splitlines())
    return "\n".join(lines)
