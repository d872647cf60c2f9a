"""Quality control of a cohort: per-volume figures and the checks that raise named flags.

Figures (:func:`measure`) are what one file says about itself: shape, voxel
sizes, affine, qform/sform codes, obliquity, non-finite voxels, value range,
a sha256 of the voxel values, per-volume means of a 4D image and the values of
a label map. They are computed from the file alone, in a worker during ``run``
(``qc: true``; into the log's ``details``) or by ``niconv report``.

Checks turn figures into flags. Each check is one class in :data:`CHECKS`
(its ``name`` is the flag, as in ``--fail-on``): a per-volume check looks at
one volume's figures (and its paired label map's), a cohort check at all of
them (majority orientation, robust outliers, duplicates). A flag carries its
evidence, the numbers that raised it.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
from pydantic import Field, field_validator

from .paths import resolve_path
from .schema import ConfigModel
from .text import fmt_dtype

#: Bump when :func:`measure` changes what it records, so cached figures are measured again.
FIGURES_VERSION = 1
#: Distinct values of a label map recorded (a label map has a few dozen).
MAX_LABEL_VALUES = 256
#: Grids closer than these are one grid (float32 header rounding).
GRID_MM, GRID_DEGREES = 0.01, 0.01
#: A robust outlier also differs from the median by more than this fraction of it (a voxel more
#: or a rounding of the spacing is not one).
OUTLIER_FLOOR = 0.05


class QcOptions(ConfigModel):
    """``qc:`` of a config (``qc: true`` is ``qc: {run: true}``)."""

    run: bool = Field(False, description="measure each volume in the workers during run (figures into details)")
    labels: Optional[Union[str, tuple[str, ...]]] = Field(
        None, description="pattern of each image's label map, e.g. '{stem}_seg.nii.gz' (default: convert.labels)")
    labels_root: Optional[Path] = Field(None, description="folder the label pattern is looked up in (relative: "
                                                          "to the config file's folder)")
    label_values: Optional[tuple[float, ...]] = Field(None, description="the values a label map may hold")
    outlier_k: float = Field(5.0, gt=0, description="spacing/shape outliers: outside median +- k * MAD")
    oblique_degrees: float = Field(5.0, ge=0, description="oblique flag: voxel axes this far from world axes")

    _labels_root = field_validator("labels_root", mode="before")(resolve_path)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        from .converters import check_pair_patterns

        return check_pair_patterns(v)


def qc_options(value: Any) -> Any:
    """``qc: true|false`` as the mapping it stands for (a pydantic before-validator)."""
    if isinstance(value, bool):
        return {"run": value}
    if value is None:
        return {}
    return value


# ------------------------------------------------------------------------------------ figures


def measure(path: str, label_map: bool = False, data: np.ndarray | None = None, image=None) -> dict:
    """The QC figures of one image file.

    Parameters
    ----------
    path : str
        Any image nibabel reads.
    label_map : bool
        Also record its distinct values (up to :data:`MAX_LABEL_VALUES`).
    data, image : optional
        An already-read volume (``Volume.data``, ``Volume.image``), not read again.

    Returns
    -------
    dict
        JSON-serialisable: ``shape``, ``zooms`` (mm), ``affine`` (4x4 rows), ``axcodes``,
        ``codes`` (``[qform, sform]``, NIfTI only), ``oblique_degrees``, ``voxels``,
        ``nonfinite`` (``{nan, posinf, neginf}``), ``min``/``max``/``mean`` of the
        finite values, ``sha256`` (of dtype, shape and voxel bytes), ``volume_means``
        and ``volume_nonfinite`` (4D), ``label_values`` (label maps).

    Raises
    ------
    niconv.errors.NiconvError
        If the file cannot be read (:func:`niconv.volume.read_volume`).
    """
    import nibabel as nib

    if data is None:
        from .volume import read_volume

        vol = read_volume(path)
        data, image = vol.data, vol.image
    affine = np.asarray(image.affine, dtype=np.float64)
    values = _numeric(data)
    fig: dict[str, Any] = {
        "version": FIGURES_VERSION,
        "shape": [int(s) for s in data.shape],
        "dtype": fmt_dtype(data.dtype),
        "zooms": [round(float(z), 6) for z in image.header.get_zooms()[:3]],
        "affine": [[round(float(x), 6) for x in row] for row in affine],
        "axcodes": "".join(c or "?" for c in nib.aff2axcodes(affine)),
        "oblique_degrees": round(float(np.degrees(np.max(nib.affines.obliquity(affine)))), 4),
        "voxels": int(data.size),
    }
    header = image.header
    if isinstance(header, nib.Nifti1Header):  # NIfTI-2's header is one too
        fig["codes"] = [int(header["qform_code"]), int(header["sform_code"])]
    finite = np.isfinite(values) if values.dtype.kind in "fc" else None
    fig["nonfinite"] = {"nan": int(np.isnan(values).sum()), "posinf": int(np.isposinf(values).sum()),
                        "neginf": int(np.isneginf(values).sum())} if finite is not None and not finite.all() \
        else {"nan": 0, "posinf": 0, "neginf": 0}
    good = values[finite] if finite is not None and not finite.all() else values
    if good.size:
        fig.update(min=_num(good.min()), max=_num(good.max()), mean=_num(good.mean(dtype=np.float64)))
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(np.ascontiguousarray(data).view(np.uint8).reshape(-1).data)
    fig["sha256"] = h.hexdigest()
    if values.ndim >= 4 and math.prod(values.shape[3:]) > 1:
        per = values.reshape(values.shape[:3] + (-1,))
        means, bad = [], []
        for t in range(per.shape[3]):
            v = per[..., t]
            ok = np.isfinite(v) if v.dtype.kind in "fc" else np.ones(v.shape, bool)
            means.append(_num(v[ok].mean(dtype=np.float64)) if ok.any() else None)
            bad.append(int(v.size - ok.sum()))
            if ok.any() and v[ok].min() == v[ok].max():
                fig.setdefault("constant_volumes", []).append(t)
        fig["volume_means"], fig["volume_nonfinite"] = means, bad
    if label_map:
        uniq = np.unique(good[: good.size]) if good.size else np.array([])
        fig["label_values"] = [_num(v) for v in uniq[:MAX_LABEL_VALUES]]
        fig["label_count"] = int(uniq.size)
    return fig


def _numeric(data: np.ndarray) -> np.ndarray:
    """Values to measure: RGB channels stacked last, complex as magnitude."""
    if data.dtype.names:
        return np.stack([data[n] for n in data.dtype.names], axis=-1)
    if data.dtype.kind == "c":
        return np.abs(data)
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    return data


def _num(x) -> float | int:
    x = x.item() if hasattr(x, "item") else x
    return int(x) if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer()
                                                         and abs(x) < 2 ** 53) else round(float(x), 6)


# ------------------------------------------------------------------------------------ flags


@dataclass(frozen=True)
class Flag:
    """One raised check: its name (the flag), a sentence, and the numbers behind it."""

    name: str
    message: str
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"flag": self.name, "message": self.message, "evidence": self.evidence}


@dataclass
class Item:
    """One volume of the cohort as the checks see it.

    Attributes
    ----------
    key : str
        The task id.
    path : str
        The file measured.
    figures : dict or None
        :func:`measure` of it; None when it could not be measured.
    label : dict or None
        ``{"path", "figures"}`` of its paired label map.
    label_map : bool
        The volume is itself a label map.
    """

    key: str
    path: str
    figures: Optional[dict]
    label: Optional[dict] = None
    label_map: bool = False
    flags: list = field(default_factory=list)


class Check:
    """A check: ``name`` (the flag), ``title`` (what raises it, for the README and the page),
    ``scope`` (``volume``: :meth:`volume` per item; ``cohort``: :meth:`cohort` once)."""

    name: ClassVar[str]
    title: ClassVar[str]
    scope: ClassVar[str] = "volume"

    def volume(self, item: Item, options: QcOptions) -> Optional[Flag]:
        return None

    def cohort(self, items: list[Item], options: QcOptions) -> dict[str, Flag]:
        return {}


def _spatial(fig: dict, key: str) -> list[float]:
    """A figure's first three values along the R, A, S axes (so orientation does not make outliers)."""
    values, codes = fig[key][:3], fig.get("axcodes", "RAS")
    order = {c: i for i, c in enumerate(codes)}
    axes = [next((order[c] for c in pair if c in order), None) for pair in ("RL", "AP", "SI")]
    if None in axes or len(values) < 3:
        return list(values)
    return [values[a] for a in axes]


def robust_outliers(values: list[float], k: float) -> tuple[float, float, list[bool]]:
    """Median, MAD and which values lie outside ``median +- k * MAD`` (and over
    :data:`OUTLIER_FLOOR` of the median away from it)."""
    arr = np.asarray(values, dtype=np.float64)
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med)))
    limit = max(k * mad, OUTLIER_FLOOR * abs(med))
    return med, mad, [bool(abs(v - med) > limit) for v in arr]


class Orientation(Check):
    name = "orientation"
    title = "axis codes (e.g. LPS) differ from the cohort's most common ones"
    scope = "cohort"

    def cohort(self, items, options):
        codes = Counter(i.figures["axcodes"] for i in items)
        if len(codes) < 2:
            return {}
        major, count = codes.most_common(1)[0]
        return {i.key: Flag(self.name, f"{i.figures['axcodes']}, the cohort's majority is {major} "
                                       f"({count} of {len(items)})",
                            {"axcodes": i.figures["axcodes"], "majority": major, "majority_count": count,
                             "volumes": len(items)})
                for i in items if i.figures["axcodes"] != major}


class _Outlier(Check):
    scope = "cohort"
    key: ClassVar[str]
    unit: ClassVar[str]

    def cohort(self, items, options):
        if len(items) < 3:
            return {}
        per_item = [_spatial(i.figures, self.key) for i in items]
        axes = [robust_outliers([v[a] for v in per_item], options.outlier_k) for a in range(3)]
        meds, mads = [a[0] for a in axes], [a[1] for a in axes]
        flags = {}
        for n, (i, v) in enumerate(zip(items, per_item)):
            out = [name for a, name in enumerate("RAS") if axes[a][2][n]]
            if out:
                flags[i.key] = Flag(self.name, f"{_x(v)}{self.unit} (R, A, S), cohort median {_x(meds)}{self.unit}",
                                    {"values": v, "median": meds, "mad": mads, "k": options.outlier_k, "axes": out})
        return flags


def _x(values) -> str:
    return "x".join(f"{v:g}" for v in values)


class Spacing(_Outlier):
    name = "spacing"
    title = "voxel size along R, A or S outside the cohort's median +- k*MAD (qc.outlier_k)"
    key, unit = "zooms", " mm"


class Shape(_Outlier):
    name = "shape"
    title = "voxel count along R, A or S outside the cohort's median +- k*MAD (qc.outlier_k)"
    key, unit = "shape", ""


class NoTransform(Check):
    name = "no_transform"
    title = "NIfTI qform and sform codes both 0: the affine is a guess, not where the voxels are"

    def volume(self, item, options):
        codes = item.figures.get("codes")
        if codes == [0, 0]:
            return Flag(self.name, "qform and sform codes are 0: no transform", {"qform_code": 0, "sform_code": 0})
        return None


class Oblique(Check):
    name = "oblique"
    title = "voxel axes more than qc.oblique_degrees (default 5) from the world axes"

    def volume(self, item, options):
        deg = item.figures["oblique_degrees"]
        if deg > options.oblique_degrees:
            return Flag(self.name, f"voxel axes {deg:.1f} degrees from the world axes",
                        {"degrees": deg, "threshold": options.oblique_degrees})
        return None


class NonFinite(Check):
    name = "nonfinite"
    title = "NaN or infinite voxels (their count)"

    def volume(self, item, options):
        bad = item.figures["nonfinite"]
        count = sum(bad.values())
        if count:
            return Flag(self.name, f"{count} of {item.figures['voxels']} voxels are NaN or infinite",
                        {**bad, "count": count, "voxels": item.figures["voxels"]})
        return None


class Empty(Check):
    name = "empty"
    title = "every finite voxel has one value (all 0: empty)"

    def volume(self, item, options):
        fig = item.figures
        if "min" not in fig or fig["min"] == fig["max"]:
            value = fig.get("min")
            what = "no finite voxel" if value is None else "every voxel is 0 (empty)" if value == 0 \
                else f"every voxel is {value:g} (constant)"
            return Flag(self.name, what, {"value": value})
        return None


class Geometry(Check):
    name = "geometry"
    title = "image and its label map on different grids: shape, or affine (corner distance in mm, angle in degrees)"

    def volume(self, item, options):
        if item.label is None or not item.label.get("figures"):
            return None
        grid = grid_difference(item.figures, item.label["figures"])
        if grid["shape_differs"] or grid["mm"] > GRID_MM or grid["degrees"] > GRID_DEGREES:
            parts = []
            if grid["shape_differs"]:
                parts.append(f"shape {_x(grid['image_shape'])} vs label map {_x(grid['label_shape'])}")
            if grid["mm"] > GRID_MM:
                parts.append(f"voxel corners up to {grid['mm']:.3g} mm apart")
            if grid["degrees"] > GRID_DEGREES:
                parts.append(f"axes {grid['degrees']:.3g} degrees apart")
            return Flag(self.name, "label map on another grid: " + ", ".join(parts),
                        {**grid, "label_path": item.label["path"]})
        return None


def grid_difference(a: dict, b: dict) -> dict:
    """How far two volumes' grids are apart: spatial shapes, the largest distance (mm) between
    the positions of the grid's corner voxels, and the largest angle (degrees) between axes."""
    sa, sb = a["shape"][:3], b["shape"][:3]
    A, B = np.asarray(a["affine"]), np.asarray(b["affine"])
    corners = np.array([[i, j, k, 1.0] for i in (0, sa[0] - 1) for j in (0, sa[1] - 1) for k in (0, sa[2] - 1)]).T
    mm = float(np.max(np.linalg.norm((A @ corners - B @ corners)[:3], axis=0)))
    ua = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
    ub = B[:3, :3] / np.linalg.norm(B[:3, :3], axis=0)
    cos = np.clip(np.sum(ua * ub, axis=0), -1.0, 1.0)
    deg = float(np.degrees(np.max(np.arccos(cos))))
    return {"image_shape": sa, "label_shape": sb, "shape_differs": list(sa) != list(sb),
            "mm": round(mm, 4), "degrees": round(deg, 4)}


class Labels(Check):
    name = "labels"
    title = "label map values outside qc.label_values (without it: values that are not whole numbers of at least 0)"

    def volume(self, item, options):
        figs = item.figures if item.label_map else (item.label or {}).get("figures")
        if not figs or "label_values" not in figs:
            return None
        values = figs["label_values"]
        if options.label_values is not None:
            expected = set(options.label_values)
            bad = [v for v in values if v not in expected]
        else:
            expected = None
            bad = [v for v in values if v < 0 or float(v) != int(v)]
        if not bad:
            return None
        where = "" if item.label_map else f" in its label map {item.label['path']}"
        return Flag(self.name, f"unexpected label values{where}: {', '.join(f'{v:g}' for v in bad[:10])}",
                    {"unexpected": bad, "expected": sorted(expected) if expected is not None else None,
                     "values": values})


class Duplicate(Check):
    name = "duplicate"
    title = "same voxel values (sha256) as another input under a different name"
    scope = "cohort"

    def cohort(self, items, options):
        by_hash: dict[str, list[Item]] = {}
        for i in items:
            by_hash.setdefault(i.figures["sha256"], []).append(i)
        flags = {}
        for digest, same in by_hash.items():
            if len({i.path for i in same}) < 2:
                continue
            for i in same:
                others = sorted({o.path for o in same if o.path != i.path})
                flags[i.key] = Flag(self.name, f"same voxels as {', '.join(others)}",
                                    {"sha256": digest, "same_as": others})
        return flags


class Inconsistent4D(Check):
    name = "inconsistent_4d"
    title = "4D volumes that differ from the others: constant, other NaN counts, or mean outside median +- k*MAD"

    def volume(self, item, options):
        fig = item.figures
        means = fig.get("volume_means")
        if not means or len(means) < 2:
            return None
        odd: set[int] = set(fig.get("constant_volumes", []))
        if len(odd) == len(means):
            odd = set()  # all constant: the empty check says so
        bad = fig.get("volume_nonfinite", [])
        if bad and len(set(bad)) > 1:
            common = Counter(bad).most_common(1)[0][0]
            odd.update(t for t, b in enumerate(bad) if b != common)
        known = [(t, m) for t, m in enumerate(means) if m is not None]
        odd.update(t for t, m in enumerate(means) if m is None)
        if len(known) >= 3:
            med, mad, out = robust_outliers([m for _, m in known], options.outlier_k)
            odd.update(t for (t, _), o in zip(known, out) if o)
        else:
            med, mad = float(np.median([m for _, m in known])) if known else None, None
        if not odd:
            return None
        vols = sorted(odd)
        return Flag(self.name, f"{len(vols)} of {len(means)} volumes differ from the others: "
                               f"{', '.join(map(str, vols[:10]))}",
                    {"volumes": vols, "means": [means[t] for t in vols], "median_mean": med, "mad": mad,
                     "constant": sorted(fig.get("constant_volumes", [])),
                     "nonfinite": [bad[t] for t in vols] if bad else []})


#: Every check, by flag name, in the order the report shows them.
CHECKS: dict[str, Check] = {c.name: c() for c in (
    Orientation, Spacing, Shape, NoTransform, Oblique, NonFinite, Empty, Geometry, Labels, Duplicate,
    Inconsistent4D)}


def flag_names() -> tuple[str, ...]:
    return tuple(CHECKS)


def run_checks(items: list[Item], options: QcOptions) -> None:
    """Raise every check's flags on ``items`` (appended to ``Item.flags``, in :data:`CHECKS` order).

    Items without figures are left out; cohort checks compare the others with
    each other (label maps with label maps, images with images).
    """
    measured = [i for i in items if i.figures]
    groups = [[i for i in measured if not i.label_map], [i for i in measured if i.label_map]]
    for check in CHECKS.values():
        if check.scope == "volume":
            for i in measured:
                flag = check.volume(i, options)
                if flag is not None:
                    i.flags.append(flag)
        else:
            pool = measured if check.name == "duplicate" else None
            for group in ([pool] if pool is not None else groups):
                if not group:
                    continue
                found = check.cohort(group, options)
                for i in group:
                    if i.key in found:
                        i.flags.append(found[i.key])


def check_table() -> str:
    """The flags as a Markdown table (the README's list)."""
    lines = ["| flag | raised when |", "|---|---|"]
    lines += [f"| `{c.name}` | {c.title} |" for c in CHECKS.values()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tasks


def volume_path(converter: str, input_path: str, output_path: str) -> str | None:
    """The image a task is about: its input, or for a converter that reads arrays (``nifti``)
    or a DICOM series (a folder of files) the image it wrote; None when there is none."""
    import os

    from . import converters

    try:
        reads_images = converters.get(converter).inputs == "image"
    except (KeyError, ModuleNotFoundError):
        reads_images = True
    if reads_images and not os.path.isdir(input_path):
        return input_path
    return output_path if output_path.lower().endswith((".nii", ".nii.gz")) else None


def task_figures(task) -> dict:
    """The figures of a task's volume and of its paired label map (``preprocess`` ``labels``), for
    the log's ``details["qc"]``; a volume that cannot be measured gets ``{"error": why}``."""
    out: dict[str, Any] = {}
    path = volume_path(task.converter, task.input_path, task.output_path)
    if path is not None:
        out["volume"] = _safe_measure(path, task.label_map)
    label = task.pair("label")
    if label:
        out["label"] = {"path": label, "figures": _safe_measure(label, True)}
    return out


def _safe_measure(path: str, label_map: bool) -> dict:
    from .errors import NiconvError

    try:
        return measure(path, label_map)
    except NiconvError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a file QC trips over costs only its figures
        return {"error": f"{path}: cannot measure: {type(exc).__name__}: {exc}"}
