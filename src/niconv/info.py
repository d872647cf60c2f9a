"""``niconv info``: what a user checks before converting an image."""
from __future__ import annotations

import numpy as np

from .volume import load_image


def describe(path: str, header: bool = False) -> str:
    """A readable summary of one image: format, shape, dtypes, zooms with units,
    orientation, qform/sform codes, scaling, and optionally the full header.

    Raises
    ------
    niconv.errors.InputError
        If the file is missing or not a readable image.
    """
    img = load_image(path)
    hdr = img.header
    stored = np.dtype(img.get_data_dtype())
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = np.ndim(slope) > 0 or np.ndim(inter) > 0 or float(slope) != 1.0 or float(inter) != 0.0
    loaded = "float32 (scaled)" if scaled else stored.name if stored.fields is None else str(stored)
    try:
        units = hdr.get_xyzt_units()
    except AttributeError:
        units = ("mm", "sec")
    space, time_unit = (units[0] or "unknown"), (units[1] or "unknown")
    zooms = hdr.get_zooms()
    zoom_text = " x ".join(f"{z:g}" for z in zooms[:3]) + f" {space}"
    if len(zooms) > 3:
        zoom_text += ", " + ", ".join(f"{z:g}" for z in zooms[3:]) + f" {time_unit}"
    import nibabel as nib

    lines = [
        f"{path}",
        f"  format       {type(img).__name__}",
        f"  shape        {tuple(int(s) for s in img.shape)}",
        f"  dtype        stored {stored.name if stored.fields is None else stored}, loaded as {loaded}",
        f"  zooms        {zoom_text}",
        f"  orientation  {''.join(c or '?' for c in nib.aff2axcodes(img.affine))}",
    ]
    if "qform_code" in hdr:
        lines.append(f"  qform/sform  qform_code={int(hdr['qform_code'])} sform_code={int(hdr['sform_code'])}")
    if scaled:
        s = f"{float(slope):g}" if np.ndim(slope) == 0 else "per slice"
        i = f"{float(inter):g}" if np.ndim(inter) == 0 else "per slice"
        lines.append(f"  scaling      scl_slope={s} scl_inter={i}")
    else:
        lines.append("  scaling      none")
    lines.append("  affine       " + np.array2string(np.asarray(img.affine), precision=4, suppress_small=True)
                 .replace("\n", "\n               "))
    if header:
        lines.append("  header")
        lines.extend("    " + ln for ln in str(hdr).splitlines())
    return "\n".join(lines)
