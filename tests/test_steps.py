"""The preprocess step table: one class per step, registered once; the config schema, the label-map rule,
the memory estimate and the README's step list come from it."""
from __future__ import annotations

import json
import shutil
from typing import Annotated

import nibabel as nib
import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from helpers import REPO, rows_of, write_config
from niconv import preprocess_steps
from niconv.cli import main
from niconv.config import load_config
from niconv.converters.preprocess import Options, memory_extra
from niconv.errors import ConfigError
from niconv.manifest import task_id
from niconv.preprocess_steps import STEPS, Arrays, Grid, Step, register, step_table

NAMES = "reorient, resample, normalize, clip, crop_pad, cast"


def config_errors(tmp_path, steps: str) -> list[tuple[str, str]]:
    cfg = write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: out}}\nconvert:\n  to: preprocess\n"
                                 f"  steps:\n{steps}")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    return exc.value.errors


# ---------------------------------------------------------------- the table


def test_the_table_holds_every_step_with_its_kind():
    assert tuple(STEPS) == ("reorient", "resample", "normalize", "clip", "crop_pad", "cast")
    assert {n for n, s in STEPS.items() if s.spatial} == {"reorient", "resample", "crop_pad"}
    assert {n for n, s in STEPS.items() if s.grid is not None} == {"resample", "crop_pad"}
    assert [n for n, s in STEPS.items() if s.last] == ["cast"]
    assert Options.model_fields["steps"].description == f"ordered steps, each a one-key mapping: {NAMES}"


def test_resolved_options_and_task_ids_are_unchanged():
    """Every step and option form, resolved as before the table (same JSON, same task id: resumed runs redo nothing)."""
    steps = [
        "reorient", {"reorient": "lps"},
        {"resample": {"spacing": 2}}, {"resample": {"shape": [20, 30, 40], "order": 1, "antialias": False}},
        {"normalize": {"method": "zscore", "mask": "nonzero"}}, {"normalize": {"method": "minmax", "range": [-1, 1]}},
        {"normalize": {"method": "percentile", "percentiles": [1, 99]}},
        {"normalize": {"method": "window", "preset": "brain"}},
        {"normalize": {"method": "window", "level": 40, "width": 80, "range": [0, 255]}},
        {"clip": {"percentiles": [0.5, 99.5], "mask": "nonzero"}}, {"clip": {"range": [-1000, 2000]}},
        {"crop_pad": {"shape": [16, 16, 16]}},
        {"crop_pad": {"shape": [8, 9, 10], "mode": "foreground", "pad_value": -1, "threshold": 0.5}},
        "cast",
    ]
    options = Options(steps=steps, labels="{stem}_seg.nii.gz", format="nifti")
    dumped = options.model_dump(mode="json")
    none7 = {"level": None, "mask": "none", "percentiles": None, "preset": None, "range": None, "width": None}
    assert dumped["steps"] == [
        {"reorient": "RAS"}, {"reorient": "LPS"},
        {"resample": {"spacing": [2.0, 2.0, 2.0], "shape": None, "order": 3, "antialias": True}},
        {"resample": {"spacing": None, "shape": [20, 30, 40], "order": 1, "antialias": False}},
        {"normalize": {**none7, "method": "zscore", "mask": "nonzero"}},
        {"normalize": {**none7, "method": "minmax", "range": [-1.0, 1.0]}},
        {"normalize": {**none7, "method": "percentile", "percentiles": [1.0, 99.0]}},
        {"normalize": {**none7, "method": "window", "preset": "brain"}},
        {"normalize": {**none7, "method": "window", "level": 40.0, "width": 80.0, "range": [0.0, 255.0]}},
        {"clip": {"percentiles": [0.5, 99.5], "range": None, "mask": "nonzero"}},
        {"clip": {"percentiles": None, "range": [-1000.0, 2000.0], "mask": "none"}},
        {"crop_pad": {"shape": [16, 16, 16], "mode": "center", "pad_value": 0.0, "threshold": None}},
        {"crop_pad": {"shape": [8, 9, 10], "mode": "foreground", "pad_value": -1.0, "threshold": 0.5}},
        {"cast": "float32"},
    ]
    # the id the code before the step table gave these options
    assert task_id({"rel_path": "a.nii.gz", "size": 1, "mtime_ns": 2}, "preprocess", dumped) == "689b5774eeb717bc"
    assert Options.model_validate(json.loads(json.dumps(dumped))) == options
    entry = options.steps[2]
    assert entry.step is STEPS["resample"] and entry.options.spacing == (2.0, 2.0, 2.0)


def test_resolved_window_normalize_validates_again():
    """The run record's resolved options load again: mask: none, the default, is not "given" to a window."""
    options = Options(steps=[{"normalize": {"method": "window", "preset": "brain"}}])
    dumped = options.model_dump(mode="json")
    assert dumped["steps"][0]["normalize"]["mask"] == "none"
    assert Options.model_validate(dumped) == options
    with pytest.raises(ValueError, match="mask does not apply to method window"):
        Options(steps=[{"normalize": {"method": "window", "preset": "brain", "mask": "nonzero"}}])


# ---------------------------------------------------------------- error messages


def test_unknown_step_name_says_did_you_mean(tmp_path):
    assert config_errors(tmp_path, "    - reorient: RAS\n    - resampel: {spacing: 1}\n    - nromalize\n") == [
        ("convert.steps[1]", f"expected one of {NAMES}, found 'resampel'; did you mean 'resample'?"),
        ("convert.steps[2]", f"expected one of {NAMES}, found 'nromalize'; did you mean 'normalize'?"),
    ]


def test_bad_option_inside_a_step_is_named_by_its_key_path(tmp_path):
    assert config_errors(tmp_path, "    - resample: {spacing: 1, order: 7}\n    - crop_pad: {shape: [8, 0, 8]}\n"
                                   "    - normalize: {method: zscore, percentiles: [1, 99]}\n"
                                   "    - clip: 2\n    - resample\n") == [
        ("convert.steps[0].resample.order", "expected a whole number from 0 to 5, found 7"),
        ("convert.steps[1].crop_pad.shape[1]", "expected a whole number of at least 1, found 0"),
        ("convert.steps[2].normalize", "percentiles does not apply to method zscore (it takes: mask)"),
        ("convert.steps[3]", "expected clip: {percentiles, range, mask}, found clip: 2"),
        ("convert.steps[4]", "expected resample: {spacing, shape, order, antialias}, found 'resample' alone"),
    ]
    assert config_errors(tmp_path, "    - cast: uint8\n    - clip: {range: [0, 1]}\n") == [
        ("convert.steps", "cast must be the last step (steps after it would work on the cast dtype); "
                          "found it at steps[0], followed by clip")]


# ---------------------------------------------------------------- a step added to the table


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlipOptions(_Strict):
    axis: int = Field(0, ge=0, le=2)


class Flip(Step):
    """Reverse one voxel axis, the affine updated (a test step)."""

    name = "flip"
    options = FlipOptions
    default = {}
    spatial = True

    @staticmethod
    def apply(p, a):
        m = np.eye(4)
        m[p.axis, p.axis], m[p.axis, 3] = -1.0, a.data.shape[1 + p.axis] - 1
        flip = lambda x: None if x is None else np.flip(x, axis=1 + p.axis)  # noqa: E731
        return Arrays(flip(a.data), a.affine @ m, flip(a.label)), {"axis": p.axis}


class Scale(Step):
    """Multiply the intensities by a factor (a test step)."""

    name = "scale"
    options = Annotated[float, Field(gt=0)]

    @staticmethod
    def apply(p, a):
        np.multiply(a.data, np.float32(p), out=a.data)
        return a, {"factor": p}


class Supersample(Step):
    """Split every voxel into k x k x k voxels (a test step)."""

    name = "supersample"
    options = Annotated[int, Field(ge=1)]
    spatial = True

    @staticmethod
    def apply(k, a):
        up = lambda x: None if x is None else x.repeat(k, 1).repeat(k, 2).repeat(k, 3)  # noqa: E731
        m = np.diag([1 / k] * 3 + [1.0])
        m[:3, 3] = (1 / k - 1) / 2
        return Arrays(up(a.data), a.affine @ m, up(a.label)), {}

    @staticmethod
    def grid(k, g):
        return Grid(g.voxels * k ** 3, g.voxel_volume / k ** 3)


@pytest.fixture
def test_steps(monkeypatch):
    """Flip, Scale and Supersample registered through the public registry, for this test only."""
    monkeypatch.setattr(preprocess_steps, "STEPS", dict(STEPS))
    for step in (Flip, Scale, Supersample):
        register(step)
    return preprocess_steps.STEPS


def test_a_registered_step_is_usable_in_a_config(cohort, tmp_path, frozen_inputs, test_steps):
    """One class and one register() call: the step validates, runs on images and paired label maps
    (spatial) or not on label maps (intensity), is recorded with its defaults and named in errors."""
    (tmp_path / "in").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "in" / "t2s.nii.gz")
    image = nib.load(str(tmp_path / "in" / "t2s.nii.gz"))
    raw = np.asanyarray(image.dataobj)
    seg = (raw > np.percentile(raw, 80)).astype(np.uint8) + (raw > np.percentile(raw, 95))
    nib.save(nib.Nifti1Image(seg, image.affine), str(tmp_path / "labels" / "t2s_seg.nii.gz"))
    atlas = nib.load(str(cohort / "bigbrain_labels.nii.gz")).slicer[100:140, 120:150, 150:160]
    nib.save(atlas, str(tmp_path / "in" / "atlas_bb.nii.gz"))
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input:\n  root: in\n  label_maps: ['atlas*']\noutput: {root: out}\njobs: 1\n"
                                 "convert:\n  to: preprocess\n  labels: '{stem}_seg.nii.gz'\n  labels_root: labels\n"
                                 "  labels_required: false\n"
                                 "  steps:\n    - flip: {axis: 1}\n    - scale: 3\n    - supersample: 2\n")
    assert main(["run", str(cfg), "--quiet"]) == 0

    def up(x):
        return x.repeat(2, 0).repeat(2, 1).repeat(2, 2)

    with np.load(tmp_path / "out" / "t2s.npz") as z:
        expected = up(np.flip(raw.astype(np.float32), axis=1) * np.float32(3))
        np.testing.assert_array_equal(z["data"][0], expected)
        np.testing.assert_array_equal(z["label"][0], up(np.flip(seg, axis=1)))
        # output point (0.5, 0.5, 0.5), the centre of the 8 voxels split from the flipped image's first voxel,
        # is input voxel (0, 53, 0)
        np.testing.assert_allclose(z["affine"] @ [0.5, 0.5, 0.5, 1], image.affine @ [0, 53, 0, 1], atol=1e-4)
    with np.load(tmp_path / "out" / "atlas_bb.npz") as z:  # a label map: spatial steps only
        assert z["data"].dtype == np.uint8
        np.testing.assert_array_equal(z["data"][0], up(np.flip(np.asanyarray(atlas.dataobj), axis=1)))
    got = {r["input_path"].rsplit("/", 1)[1]: json.loads(r["details"]) for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert got["t2s.nii.gz"]["steps"] == [{"flip": {"axis": 1}}, {"scale": 3.0}, {"supersample": 2}]
    assert [(a["name"], a.get("skipped")) for a in got["atlas_bb.nii.gz"]["applied"]] == [
        ("flip", None), ("scale", "label map: no intensity step"), ("supersample", None)]
    assert got["t2s.nii.gz"]["applied"][1] == {"step": 1, "name": "scale", "factor": 3.0}

    assert config_errors(tmp_path, "    - scal: 2\n    - flip: {axis: 3}\n    - flip\n    - scale\n") == [
        ("convert.steps[0]", f"expected one of {NAMES}, flip, scale, supersample, found 'scal'; "
                             "did you mean 'scale'?"),
        ("convert.steps[1].flip.axis", "expected a whole number from 0 to 2, found 3"),
        ("convert.steps[3]", "expected scale: <value>, found 'scale' alone")]
    assert Options(steps=["flip"]).model_dump(mode="json")["steps"] == [{"flip": {"axis": 0}}]


def test_memory_estimate_follows_a_registered_step_grid(cohort, test_steps):
    path = str(cohort / "sct_t2s.nii.gz")  # 49 x 54 x 9 voxels
    voxels = 49 * 54 * 9
    # two float32 arrays of the largest grid, less the input grid
    assert memory_extra(path, Options(steps=[{"supersample": 2}])) == (8 - 1) * voxels * 4 * 2
    assert memory_extra(path, Options(steps=[{"supersample": 2}, {"crop_pad": {"shape": [4, 4, 4]}}])) == \
        (8 - 1) * voxels * 4 * 2
    assert memory_extra(path, Options(steps=[{"flip": {}}, {"scale": 2}])) == 0  # no grid: header not read


def test_register_refuses_a_taken_or_unusable_name(test_steps):
    class Again(Scale):
        pass

    class Bad(Scale):
        name = "model_dump"

    with pytest.raises(ValueError, match="step 'scale' is registered already"):
        register(Again)
    with pytest.raises(ValueError, match="step name 'model_dump': expected an identifier that is not a pydantic"):
        register(Bad)


# ---------------------------------------------------------------- the README's step list


def test_step_table_is_made_from_the_registry(test_steps):
    table = step_table().splitlines()
    assert table[:2] == ["| step | options (defaults) | label maps | does |", "|---|---|---|---|"]
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| `{n}`" for n in test_steps]
    assert table[3].startswith("| `resample` | {`spacing`, `shape`, `order: 3`, `antialias: true`} | yes | ")
    assert table[7].startswith("| `cast` | `float32` \\| `float16` \\| ")
    assert table[-2] == "| `scale` | `float` | skipped | Multiply the intensities by a factor (a test step). |"
    assert table[-3] == "| `flip` | {`axis: 0`} | yes | Reverse one voxel axis, the affine updated (a test step). |"


def test_readme_step_table_is_the_registry_s():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if "| step | options (defaults) |" not in readme:
        pytest.skip("the README has no step table yet")
    assert step_table() in readme
