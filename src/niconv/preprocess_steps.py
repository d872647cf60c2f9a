"""The steps of ``to: preprocess``: one class per step, registered in one table.

A step is a subclass of :class:`Step`: its ``name`` (the key in ``steps:``),
its ``options`` (the pydantic model, or annotated type, of the value beside the
name), ``apply`` (the step on an image and its label map), ``spatial`` (a
label map gets the step, with nearest neighbour, or skips it as an intensity
step) and ``grid`` (the voxel grid it produces, for the memory estimate). The
config's ``steps:`` validation, the converter's memory estimate, the label-map
rule and the README's step list all come from :data:`STEPS`, so adding a step
is: write its class, add it to ``_BUILTIN``. The numerical work is in
:mod:`niconv.ops`; a step only calls it on each channel.

Arrays
------
A step works on an :class:`Arrays` record: ``data`` of shape ``(C, X, Y, Z)``
(float32 for an image; a label map listed in ``input.label_maps`` keeps its
integer dtype), its voxel-to-world ``affine`` (RAS+ mm) and the paired label map
``(1, X, Y, Z)`` or None.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional

import numpy as np
from pydantic import (BaseModel, BeforeValidator, Field, SerializeAsAny, ValidationInfo, create_model,
                      field_validator, model_serializer, model_validator)

from .ops import crop as crop_ops
from .ops import intensity as iops
from .ops import resample as rs
from .ops.orientation import axcodes, reorient, spacing_of
from .schema import ConfigModel, did_you_mean, found

CAST_DTYPES = ("float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "uint32")
_AXIS_PAIRS = ("LR", "AP", "SI")


# ---------------------------------------------------------------- records passed between steps


@dataclass(frozen=True)
class Arrays:
    """What a step works on and returns.

    Attributes
    ----------
    data : numpy.ndarray
        Shape ``(C, X, Y, Z)``: one channel per volume of the image.
    affine : numpy.ndarray
        float64 ``(4, 4)``: voxel index -> world (RAS+ mm) of ``data``'s spatial axes.
    label : numpy.ndarray or None
        The paired label map, ``(1, X, Y, Z)`` in its own integer dtype, on
        ``data``'s grid.
    """

    data: np.ndarray
    affine: np.ndarray
    label: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Grid:
    """A voxel grid as the memory estimate follows it through the steps, from the header only.

    Attributes
    ----------
    voxels : int
        Spatial voxels (X * Y * Z).
    voxel_volume : float
        Volume of one voxel in mm^3.
    """

    voxels: int
    voxel_volume: float


# ---------------------------------------------------------------- the step base and the table


class Step:
    """A preprocess step: subclass it, set the class attributes, write ``apply``, list it in ``_BUILTIN``
    (or pass it to :func:`register`).

    Attributes
    ----------
    name : str
        The key in ``steps:`` (``- resample: {...}``).
    options : type
        Pydantic model (or annotated type) of the value beside the name.
    default : object
        The value when the step is written alone (``- reorient``); ``...``
        when its options must be given.
    spatial : bool
        True: the step moves voxels (axes, voxel grid, field of view), so a
        paired label map goes along (``apply`` moves ``Arrays.label`` too) and
        an input that is a label map gets it with :meth:`for_label_map`'s
        options. False: an intensity step, which a label map skips.
    last : str
        Non-empty when the step must be the last one; says why.
    grid : callable or None
        ``grid(options, Grid) -> Grid``: the grid the step produces, for
        steps that change the number of voxels; None for those that keep it.
    """

    name: ClassVar[str]
    options: ClassVar[Any]
    default: ClassVar[Any] = ...
    spatial: ClassVar[bool] = False
    last: ClassVar[str] = ""
    grid: ClassVar[Optional[Callable[[Any, Grid], Grid]]] = None
    #: the pydantic model of ``{name: options}``, made by :func:`register`
    config: ClassVar[type[StepConfig]]

    @staticmethod
    def apply(p, a: Arrays) -> tuple[Arrays, dict]:
        """Run the step with options ``p``: the new arrays and what to record in ``details``.

        Raises
        ------
        niconv.errors.NiconvError or ValueError
            A problem of this input; the caller names the file and the step.
        """
        raise NotImplementedError

    @staticmethod
    def for_label_map(p):
        """The options for an input that is a label map: nearest neighbour, background 0."""
        return p


class StepConfig(ConfigModel):
    """One entry of ``steps:``, ``{name: options}``; a subclass per step is made by :func:`register`."""

    step: ClassVar[type[Step]]

    @property
    def options(self):
        """The step's validated options (the value beside its name)."""
        return getattr(self, self.step.name)

    @classmethod
    def field_for(cls, name: str):
        """The declared field of the step called ``name`` (its options), for config messages."""
        step = STEPS.get(name)
        return None if step is None else step.config.model_fields[name]


#: The registered steps, by name, in the order the README lists them.
STEPS: dict[str, type[Step]] = {}


def register(step: type[Step]) -> type[Step]:
    """Add a step class to :data:`STEPS`, making it usable in ``steps:``.

    Parameters
    ----------
    step : subclass of Step
        Sets at least ``name``, ``options`` and ``apply``.

    Returns
    -------
    The class itself (usable as a decorator).

    Raises
    ------
    ValueError
        If the name is not an identifier, is taken, or clashes with a
        :class:`StepConfig` attribute.
    """
    name = step.name
    if not name.isidentifier() or hasattr(StepConfig, name):
        raise ValueError(f"step name {name!r}: expected an identifier that is not a pydantic model attribute")
    if name in STEPS:
        raise ValueError(f"step {name!r} is registered already ({STEPS[name].__qualname__})")
    config = create_model(f"{step.__name__}Config", __base__=StepConfig, __module__=step.__module__,
                          **{name: (step.options, step.default)})
    config.__qualname__ = f"{step.__qualname__}.config"  # picklable by reference (worker processes)
    config.step = step
    step.config = config
    STEPS[name] = step
    return step


def step_name(item: Any) -> str | None:
    """The step name of one ``steps:`` entry as written (``{"resample": {...}}``, ``"reorient"``), or None."""
    if isinstance(item, StepConfig):
        return item.step.name
    if isinstance(item, dict) and len(item) == 1:
        return str(next(iter(item)))
    return item if isinstance(item, str) else None


def validate_step(item: Any, info: ValidationInfo) -> StepConfig:
    """One ``steps:`` entry as its step's :class:`StepConfig` (a pydantic before-validator).

    Raises
    ------
    ValueError
        For an entry that is not a one-key mapping, an unknown step name (with
        the closest name), or a step written alone whose options are required.
    pydantic.ValidationError
        For invalid options, located under the step's name (``resample.order``).
    """
    if isinstance(item, StepConfig):
        return item
    if isinstance(item, str) and item in STEPS:
        step = STEPS[item]
        if step.default is ...:
            raise ValueError(f"expected {_form(step)}, found {item!r} alone")
        item = {item: step.default}  # `- reorient` alone means its default
    names = ", ".join(STEPS)
    if isinstance(item, str):
        raise ValueError(f"expected one of {names}, found {item!r}{did_you_mean(item, STEPS)}")
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"expected a mapping with one key, one of {names}, found {found(item)}")
    name, value = next(iter(item.items()))
    if name not in STEPS:
        raise ValueError(f"expected one of {names}, found {name!r}{did_you_mean(name, STEPS)}")
    step = STEPS[name]
    if _is_model(step.options) and not isinstance(value, (dict, step.options)):
        raise ValueError(f"expected {_form(step)}, found {name}: {value!r}")
    return step.config.model_validate(item, context=info.context)


def check_order(items) -> None:
    """Refuse a step that must be last (``cast``) anywhere else.

    Raises
    ------
    ValueError
        ``cast must be the last step (why); found it at steps[i], followed by ...``.
    """
    names = [step_name(item) for item in items]
    for i, name in enumerate(names[:-1]):
        if name in STEPS and STEPS[name].last:
            raise ValueError(f"{name} must be the last step ({STEPS[name].last}); found it at steps[{i}], "
                             f"followed by {', '.join(n or '?' for n in names[i + 1:])}")


#: The type of ``steps:`` entries in an options model: each is looked up in :data:`STEPS` when it
#: is validated, so a step registered later is usable too; dumped as ``{name: options}``.
StepEntry = Annotated[SerializeAsAny[StepConfig], BeforeValidator(validate_step)]


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _form(step: type[Step]) -> str:
    """How the step is written, for messages: ``resample: {spacing, shape, order, antialias}``."""
    if _is_model(step.options):
        return f"{step.name}: {{{', '.join(step.options.model_fields)}}}"
    return f"{step.name}: <value>"


# ---------------------------------------------------------------- option models


Pair = tuple[float, float]
Three = tuple[float, float, float]
Shape3 = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


def _three_floats(value):
    # `spacing: 1.0` means isotropic
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, (list, tuple)) and len(value) != 3:
        raise ValueError(f"expected one or three voxel sizes in mm, found {list(value)}")
    return value


def _check_percentiles(p) -> None:
    if not 0.0 <= p[0] < p[1] <= 100.0:
        raise ValueError(f"percentiles: expected [low, high] with 0 <= low < high <= 100, found {list(p)}")


def _axis_codes(v):
    if v is None:
        return "RAS"
    if not isinstance(v, str):
        raise ValueError(f"expected three axis codes such as RAS or LPS, found {v!r}")
    codes = v.strip().upper()
    ok = len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in _AXIS_PAIRS)
    if not ok:
        raise ValueError(f"expected three axis codes, one of L/R, A/P, S/I each (e.g. RAS, LPS), found {v!r}")
    return codes


AxisCodes = Annotated[str, BeforeValidator(_axis_codes), Field(description="three axis codes")]


class ResampleOptions(ConfigModel):
    """``resample``: to a voxel ``spacing`` (mm, one or three numbers) or a ``shape``; spline ``order`` 0-5."""

    spacing: Optional[Three] = None
    shape: Optional[Shape3] = None
    order: int = Field(3, ge=0, le=5)
    antialias: bool = True

    @field_validator("spacing", mode="before")
    @classmethod
    def _iso(cls, v):
        return _three_floats(v)

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v):
        if v is not None and not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"expected positive voxel sizes in mm, found {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if (self.spacing is None) == (self.shape is None):
            raise ValueError("give exactly one of spacing (mm) or shape (voxels)")
        return self


class NormalizeOptions(ConfigModel):
    """``normalize``: ``method`` zscore | minmax | percentile | window, per channel."""

    method: Literal["zscore", "minmax", "percentile", "window"]
    mask: Literal["none", "nonzero"] = "none"
    range: Optional[Pair] = None
    percentiles: Optional[Pair] = None
    level: Optional[float] = None
    width: Optional[float] = None
    preset: Optional[str] = None
    scope: Literal["image", "cohort"] = Field(
        "image", description="image: statistics of each image; cohort: of the training split (a first pass)")
    statistics: Optional[tuple[dict[str, float], ...]] = Field(
        None, description="per channel, the cohort statistics to use (zscore: mean, std; minmax: low, high); "
                          "set by the run's first pass, or given to skip it")

    @model_serializer(mode="wrap")
    def _without_defaults(self, handler):
        # scope and statistics at their defaults stay out of the dump, so the task ids of
        # configs written before these keys existed stay what they were
        data = handler(self)
        if isinstance(data, dict):
            if self.scope == "image":
                data.pop("scope", None)
            if self.statistics is None:
                data.pop("statistics", None)
        return data

    @model_validator(mode="after")
    def _method_keys(self):
        allowed = {
            "zscore": {"mask"},
            "minmax": {"mask", "range"},
            "percentile": {"mask", "range", "percentiles"},
            "window": {"range", "level", "width", "preset"},
        }[self.method]
        # a default (None, mask: none) counts as absent, so a dump of resolved options validates again
        extra = [k for k in ("mask", "range", "percentiles", "level", "width", "preset")
                 if k not in allowed and k in self.model_fields_set
                 and getattr(self, k) != type(self).model_fields[k].default]
        if extra:
            raise ValueError(f"{', '.join(extra)} does not apply to method {self.method} "
                             f"(it takes: {', '.join(sorted(allowed))})")
        if self.scope == "cohort" and self.method not in COHORT_METHODS:
            raise ValueError(f"scope: cohort works with method {', '.join(COHORT_METHODS)}, found method "
                             f"{self.method} (use scope: image)")
        if self.statistics is not None:
            if self.scope != "cohort":
                raise ValueError("statistics apply to scope: cohort only; add scope: cohort or remove statistics")
            keys = COHORT_METHODS[self.method]
            bad = [i for i, s in enumerate(self.statistics) if not set(keys) <= set(s)]
            if bad:
                raise ValueError(f"statistics[{bad[0]}]: expected the keys {', '.join(keys)} for method "
                                 f"{self.method}, found {', '.join(sorted(self.statistics[bad[0]])) or 'none'}")
            if self.method == "zscore" and not all(s["std"] > 0 for s in self.statistics):
                raise ValueError("statistics: expected std above 0 for every channel")
        if self.range is not None and self.range[0] == self.range[1]:
            raise ValueError(f"range: expected two different numbers, found {list(self.range)}")
        if self.percentiles is not None:
            _check_percentiles(self.percentiles)
        if self.method == "window":
            if self.preset is not None:
                if self.level is not None or self.width is not None:
                    raise ValueError("window: give a preset or level and width, not both")
                if self.preset not in iops.CT_WINDOWS:
                    raise ValueError(f"preset: unknown CT window {self.preset!r}; expected one of "
                                     f"{', '.join(iops.CT_WINDOWS)}{did_you_mean(self.preset, iops.CT_WINDOWS)}")
            elif self.level is None or self.width is None:
                raise ValueError("window: give a preset name or both level and width (HU)")
            elif not self.width > 0:
                raise ValueError(f"width: expected a positive window width (HU), found {self.width}")
        return self


#: Methods whose statistics can be the cohort's (``scope: cohort``), and the keys of those statistics.
COHORT_METHODS = {"zscore": ("mean", "std"), "minmax": ("low", "high"), "percentile": ("low", "high")}


class ClipOptions(ConfigModel):
    """``clip``: to ``percentiles`` of the (masked) voxels, or to an absolute ``range``."""

    percentiles: Optional[Pair] = None
    range: Optional[Pair] = None
    mask: Literal["none", "nonzero"] = "none"

    @model_validator(mode="after")
    def _one(self):
        if (self.percentiles is None) == (self.range is None):
            raise ValueError("give exactly one of percentiles or range")
        if self.percentiles is not None:
            _check_percentiles(self.percentiles)
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range: expected [low, high] with low < high, found {list(self.range)}")
        return self


class CropPadOptions(ConfigModel):
    """``crop_pad``: to a fixed spatial ``shape``, window at the ``center`` or on the ``foreground``."""

    shape: Shape3
    mode: Literal["center", "foreground"] = "center"
    pad_value: float = 0.0
    threshold: Optional[float] = None


# ---------------------------------------------------------------- the steps


class Reorient(Step):
    """Flip and permute the voxel axes to the closest orientation to the axis codes
    (``RAS``, ``LPS``, ...); no interpolation."""

    name = "reorient"
    options = AxisCodes
    default = "RAS"
    spatial = True

    @staticmethod
    def apply(p: str, a: Arrays) -> tuple[Arrays, dict]:
        data, affine = _reorient4(a.data, a.affine, p)
        label = None if a.label is None else _reorient4(a.label, a.affine, p)[0]
        return Arrays(data, affine, label), {"axcodes": axcodes(affine)}


class Resample(Step):
    """To a voxel ``spacing`` (mm, one or three) or a ``shape``: spline of ``order`` 0-5,
    Gaussian anti-aliasing when shrinking; label maps nearest neighbour."""

    name = "resample"
    options = ResampleOptions
    spatial = True

    @staticmethod
    def apply(p: ResampleOptions, a: Arrays) -> tuple[Arrays, dict]:
        arr, affine, label = a.data, a.affine, a.label
        kwargs = {"spacing": p.spacing} if p.spacing is not None else {"shape": p.shape}
        grid = rs.grid_for_spacing if p.spacing is not None else rs.grid_for_shape
        new_shape, new_affine, factors = grid(arr.shape[1:], affine,
                                              p.spacing if p.spacing is not None else p.shape)
        info = {"shape": list(new_shape), "spacing": list(spacing_of(new_affine))}
        if tuple(new_shape) == arr.shape[1:] and np.all(factors == 1.0):
            return Arrays(arr, new_affine, label), {**info, "unchanged": True}  # already on the grid: no copy
        out = np.empty((arr.shape[0],) + tuple(new_shape), dtype=arr.dtype if p.order == 0 else np.float32)
        for c in range(arr.shape[0]):
            rs.resample(arr[c], affine, order=p.order, antialias=p.antialias, overwrite_input=True,
                        output=out[c], **kwargs)
        if label is not None:
            lab = np.empty((1,) + tuple(new_shape), dtype=label.dtype)
            rs.resample(label[0], affine, order=0, output=lab[0], **kwargs)
            label = lab
        return Arrays(out, new_affine, label), info

    @staticmethod
    def for_label_map(p: ResampleOptions) -> ResampleOptions:
        return p.model_copy(update={"order": 0, "antialias": False})

    @staticmethod
    def grid(p: ResampleOptions, g: Grid) -> Grid:
        if p.shape is not None:
            new = math.prod(p.shape)
            return Grid(new, g.voxel_volume * g.voxels / new)  # same field of view
        new_volume = math.prod(p.spacing)
        return Grid(int(math.ceil(g.voxels * g.voxel_volume / new_volume)), new_volume)


class Normalize(Step):
    """Per channel: ``zscore``, ``minmax`` or ``percentile`` (to ``range``, default [0, 1]),
    or a CT ``window`` (``preset``, or ``level`` and ``width`` in HU); ``mask: nonzero``
    keeps the background 0; ``scope: cohort`` (zscore, minmax, percentile) uses the training split's statistics."""

    name = "normalize"
    options = NormalizeOptions

    @staticmethod
    def apply(p: NormalizeOptions, a: Arrays) -> tuple[Arrays, dict]:
        if p.scope == "cohort":
            return a, {"method": p.method, "scope": "cohort", "channels": _normalize_cohort(p, a.data)}
        stats = []
        for x in a.data:
            if p.method == "zscore":
                stats.append(iops.zscore(x, p.mask))
            elif p.method == "minmax":
                stats.append(iops.minmax(x, p.range or (0.0, 1.0), p.mask))
            elif p.method == "percentile":
                stats.append(iops.percentile_scale(x, p.percentiles or (0.5, 99.5), p.range or (0.0, 1.0), p.mask))
            else:
                level, width = iops.CT_WINDOWS[p.preset] if p.preset else (p.level, p.width)
                stats.append(iops.window(x, level, width, p.range or (0.0, 1.0)))
        return a, {"method": p.method, "channels": stats}


def _normalize_cohort(p: NormalizeOptions, data: np.ndarray) -> list[dict]:
    """Normalize each channel in place with the cohort's statistics (``p.statistics``)."""
    if p.statistics is None:
        raise ValueError("scope: cohort needs the cohort's statistics, computed by niconv run's first pass "
                         "(or given as statistics); none were given")
    if len(p.statistics) != data.shape[0]:
        raise ValueError(f"the image has {data.shape[0]} channel(s), the cohort statistics {len(p.statistics)}")
    if p.method == "zscore":
        return [iops.standardize(x, s["mean"], s["std"], p.mask) for x, s in zip(data, p.statistics)]
    # percentile: values beyond the cohort's percentiles are clipped, as per image
    return [iops.rescale(x, s["low"], s["high"], p.range or (0.0, 1.0), p.mask, clip=p.method == "percentile")
            for x, s in zip(data, p.statistics)]


class Clip(Step):
    """Per channel, to ``percentiles`` of the (masked) voxels or to an absolute ``range``."""

    name = "clip"
    options = ClipOptions

    @staticmethod
    def apply(p: ClipOptions, a: Arrays) -> tuple[Arrays, dict]:
        if p.percentiles is not None:
            stats = [iops.clip_percentiles(x, p.percentiles, p.mask) for x in a.data]
        else:
            stats = [iops.clip_values(x, p.range[0], p.range[1], p.mask) for x in a.data]
        return a, {"channels": stats}


class CropPad(Step):
    """Crop or pad to a fixed ``shape``, the window at the ``center`` or around the
    ``foreground`` (voxels not 0, or above ``threshold``); pads with ``pad_value``, label
    maps with 0."""

    name = "crop_pad"
    options = CropPadOptions
    spatial = True

    @staticmethod
    def apply(p: CropPadOptions, a: Arrays) -> tuple[Arrays, dict]:
        bbox = crop_ops.foreground_bbox(a.data, p.threshold) if p.mode == "foreground" else None
        offsets = crop_ops.window_offsets(a.data.shape[1:], p.shape, p.mode, bbox)
        data = crop_ops.crop_pad(a.data, p.shape, offsets, p.pad_value)
        label = None if a.label is None else crop_ops.crop_pad(a.label, p.shape, offsets, 0)  # label background
        info = {"offset": list(offsets), "shape": list(p.shape),
                "foreground_bbox": None if bbox is None else [list(b) for b in bbox]}
        return Arrays(data, crop_ops.shifted_affine(a.affine, offsets), label), info

    @staticmethod
    def for_label_map(p: CropPadOptions) -> CropPadOptions:
        return p.model_copy(update={"pad_value": 0.0, "threshold": None})

    @staticmethod
    def grid(p: CropPadOptions, g: Grid) -> Grid:
        return Grid(math.prod(p.shape), g.voxel_volume)


class Cast(Step):
    """Convert to a dtype (integers rounded to nearest); a value the dtype cannot hold
    fails the task, no wrap-around. Comes last."""

    name = "cast"
    options = Literal[CAST_DTYPES]  # type: ignore[valid-type]
    default = "float32"
    last = "steps after it would work on the cast dtype"

    @staticmethod
    def apply(p: str, a: Arrays) -> tuple[Arrays, dict]:
        return dataclasses.replace(a, data=iops.cast(a.data, p)), {"dtype": p}


def _reorient4(arr, affine, target):
    data, new_affine = reorient(np.moveaxis(arr, 0, -1), affine, target)
    return np.moveaxis(data, -1, 0), new_affine


# The table: adding a step is its class above and its name here.
_BUILTIN = (Reorient, Resample, Normalize, Clip, CropPad, Cast)
for _step in _BUILTIN:
    register(_step)
del _step


# ---------------------------------------------------------------- the README's step list


def step_table() -> str:
    """The registered steps as a Markdown table (step, value, label maps, what it does), for the README."""
    rows = ["| step | options (defaults) | label maps | does |", "|---|---|---|---|"]
    for step in STEPS.values():
        does = " ".join(inspect.cleandoc(step.__doc__ or "").split("\n\n")[0].split()).replace("``", "`")
        rows.append(f"| `{step.name}` | {_value_text(step)} | {'yes' if step.spatial else 'skipped'} | {does} |")
    return "\n".join(rows) + "\n"


def _value_text(step: type[Step]) -> str:
    if _is_model(step.options):
        keys = []
        for key, field in step.options.model_fields.items():
            default = field.get_default()
            if not field.is_required() and default is not None:
                key = f"{key}: {default if isinstance(default, str) else json.dumps(default)}"
            keys.append(f"`{key}`")
        return "{" + ", ".join(keys) + "}"
    if typing.get_origin(step.options) is Literal:
        text = " \\| ".join(f"`{c}`" for c in typing.get_args(step.options))
    else:  # a scalar, maybe Annotated with constraints
        base, *meta = typing.get_args(step.options) if typing.get_origin(step.options) is Annotated else (step.options,)
        described = [m.description for m in meta if getattr(m, "description", None)]
        text = described[0] if described else f"`{getattr(base, '__name__', base)}`"
    return text if step.default is ... else f"{text} (default `{step.default}`)"
