"""Config messages in a user's words: the key path as written, what was expected as a kind of
value, what was found, every problem of the file at once, and never a name from the code."""
from __future__ import annotations

import re

import pytest

from niconv.config import SlurmOptions
from niconv.config import load_config
from niconv.converters.preprocess import preprocess_volume
from niconv.converters.slices import parse_options
from niconv.errors import ConfigError
from niconv.schema import ConfigModel, did_you_mean, validated
from helpers import niconv, write_config

IO = "input: {root: raw}\noutput: {root: out}\n"
PRE = IO + "convert:\n  to: preprocess\n  steps:\n"


def problems(tmp_path, text: str) -> list[tuple[str, str]]:
    cfg = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    return info.value.errors


CASES = {
    "crop_pad_shape_of_2": (
        PRE + "    - reorient\n    - resample: {spacing: 1}\n    - normalize: {method: zscore}\n"
              "    - crop_pad: {shape: [96, 112]}\n",
        [("convert.steps[3].crop_pad.shape", "expected a list of 3 numbers, found 2")]),
    "affine_3x3": (
        IO + "convert: {to: nifti, affine: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}\n",
        [("convert.affine", "expected 4 rows of 4 numbers (a 4x4 affine), found 3 rows of 3")]),
    "affine_4x3": (
        IO + "convert: {to: nifti, affine: [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]}\n",
        [("convert.affine", "expected 4 rows of 4 numbers (a 4x4 affine), found 4 rows of 3")]),
    "affine_word": (
        IO + "convert: {to: nifti, affine: [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, x, 1]]}\n",
        [("convert.affine[3][2]", "expected a number, found the string 'x'")]),
    "output_as_a_string": (
        "input: {root: raw}\noutput: out/\nconvert: {to: numpy}\n",
        [("output", "expected a mapping with `root`, found the string 'out/'")]),
    "globs_as_a_number": (
        "input: {root: raw, include: 5}\noutput: {root: out}\nconvert: {to: numpy}\n",
        [("input.include", "expected a glob such as '**/*.nii.gz' or a list of globs, found the number 5")]),
    "globs_as_a_mapping": (
        "input: {root: raw, exclude: {'*.tmp': yes}, label_maps: ['*_seg.nii.gz', 7]}\noutput: {root: out}\n"
        "convert: {to: numpy}\n",
        [("input.exclude", "expected a glob such as '**/*.nii.gz' or a list of globs, "
                           "found the mapping {'*.tmp': True}"),
         ("input.label_maps[1]", "expected a string, found the number 7")]),
    "negative_jobs": (
        IO + "convert: {to: numpy}\njobs: -2\n",
        [("jobs", "expected a whole number of at least 1, found -2")]),
    "jobs_in_words": (
        IO + "convert: {to: numpy}\njobs: two\n",
        [("jobs", "expected a whole number of at least 1, found the string 'two'")]),
    "wrong_type_deep_in_a_step": (
        PRE + "    - resample: {spacing: 1, order: high}\n",
        [("convert.steps[0].resample.order", "expected a whole number from 0 to 5, found the string 'high'")]),
    "every_step_problem_at_once": (
        PRE + "    - normalize: {method: zscor}\n    - clip: {range: [1]}\n    - cast: float128\n"
              "    - crop_pad: {shape: [0, 8, 8], mode: fg}\n",
        [("convert.steps[0].normalize.method",
          "expected one of 'zscore', 'minmax', 'percentile', 'window', found 'zscor'; did you mean 'zscore'?"),
         ("convert.steps[1].clip.range", "expected a list of 2 numbers, found 1"),
         ("convert.steps[2].cast", "expected one of 'float32', 'float16', 'float64', 'uint8', 'int8', 'uint16', "
                                   "'int16', 'int32', 'uint32', found 'float128'; did you mean 'float32'?"),
         ("convert.steps[3].crop_pad.shape[0]", "expected a whole number of at least 1, found 0"),
         ("convert.steps[3].crop_pad.mode", "expected 'center' or 'foreground', found 'fg'")]),
    "steps_not_one_key_each": (
        PRE + "    - 5\n    - resample\n",
        [("convert.steps[0]", "expected a mapping with one key, one of reorient, resample, normalize, clip, "
                              "crop_pad, cast, found the number 5"),
         ("convert.steps[1]", "expected resample: {spacing, shape, order, antialias}, found 'resample' alone")]),
    "unknown_key_deep_in_cluster": (
        IO + "convert: {to: numpy}\ncluster: {slurm: {partitoin: long, cpus: many}}\n",
        [("cluster.slurm.cpus", "expected a whole number of at least 1, found the string 'many'"),
         ("cluster.slurm.partitoin", "unknown key 'partitoin'; did you mean 'partition'?")]),
    "list_of_the_wrong_length": (
        IO + "convert: {to: slices, slice_range: [5], label: maybe}\n",
        [("convert.label", "expected true or false, found the string 'maybe'"),
         ("convert.slice_range", "expected a list of 2 numbers, found 1")]),
    "one_of_two_kinds": (
        IO + "convert: {to: preprocess, labels: 5}\n",
        [("convert.labels", "expected a string or a list of strings, found the number 5")]),
    "item_of_the_kind_that_fits": (
        IO + "convert: {to: slices, volumes: [1, a]}\n",
        [("convert.volumes[1]", "expected a whole number of at least 0, found the string 'a'")]),
    "convert_as_a_string": (
        IO + "convert: numpy\n",
        [("convert", "expected a mapping with `to`, found the string 'numpy'")]),
    "converter_missing": (
        IO + "convert: {compressed: true}\n",
        [("convert.to", "required key is missing; expected one of numpy, nifti, slices, preprocess")]),
    "choices_with_a_hint": (
        "input: {root: raw}\noutput: {root: out, layout: mirrored}\nconvert: {to: numpy}\nbackend: spark\n",
        [("output.layout", "expected 'mirror' or 'flat', found 'mirrored'; did you mean 'mirror'?"),
         ("backend", "expected 'loky' or 'dask', found 'spark'")]),
}


@pytest.mark.parametrize("text, expected", CASES.values(), ids=CASES.keys())
def test_each_bad_config_gives_its_exact_lines(tmp_path, text, expected):
    assert problems(tmp_path, text) == expected


def test_one_glob_alone_is_a_list_of_one(tmp_path):
    cfg = write_config(tmp_path, "input: {root: raw, include: '**/*.nii.gz', exclude: '**/tmp/**'}\n"
                                 "output: {root: out}\nconvert: {to: numpy}\n")
    config = load_config(cfg)
    assert (config.input.include, config.input.exclude) == (["**/*.nii.gz"], ["**/tmp/**"])


def test_two_bad_steps_and_a_bad_output_root_in_one_pass(tmp_path):
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: 2024}\nconvert:\n  to: preprocess\n"
                                 "  steps:\n    - resampel: {spacing: 1}\n    - crop_pad: {shape: [96, 112]}\n"
                                 "    - reorient\n    - normalise: {method: zscore}\n")
    proc = niconv("validate", cfg)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"niconv: error: {cfg}: 4 problem(s) in the config:\n"
        "  output.root: expected a folder path, found the number 2024; quote it if a folder has that name\n"
        "  convert.steps[0]: expected one of reorient, resample, normalize, clip, crop_pad, cast, "
        "found 'resampel'; did you mean 'resample'?\n"
        "  convert.steps[1].crop_pad.shape: expected a list of 3 numbers, found 2\n"
        "  convert.steps[3]: expected one of reorient, resample, normalize, clip, crop_pad, cast, "
        "found 'normalise'; did you mean 'normalize'?\n")


def test_cast_out_of_place_hides_nothing_else(tmp_path):
    errors = problems(tmp_path, "input: {root: raw}\noutput: out/\nconvert:\n  to: preprocess\n  layout: rows\n"
                                "  steps: [{cast: float16}, reorient]\n")
    assert errors == [
        ("output", "expected a mapping with `root`, found the string 'out/'"),
        ("convert.steps", "cast must be the last step (steps after it would work on the cast dtype); "
                          "found it at steps[0], followed by reorient"),
        ("convert.layout", "expected 'channels_first' or 'channels_last', found 'rows'"),
    ]


# every message of a corpus of bad configs: no names from the code, key paths as written
CORPUS = [text for text, _ in CASES.values()] + [
    IO + "convert: {to: slices, planes: [axial, top], format: gif, bit_depth: 12, window: {level: 40}}\n",
    IO + "convert: {to: slices, colour: true, contact_sheets: true, window: [1, 2, 3], volumes: -1}\n",
    IO + "convert: {to: slices, window: {level: 40, width: -1}, jpeg_quality: 0, format: jpg, bit_depth: 16}\n",
    IO + "convert: {to: numpy, level: 11, scaling: scaled, compressed: maybe}\n",
    IO + "convert: {to: numpy, compressed: false, geometry: true}\n",
    IO + "convert: {to: nifti, affine: 5, reference: '{stem}.nii.gz', key: [1]}\n",
    IO + "convert: {to: nifti, affine: [1, 2, 3, 4]}\n",
    IO + "convert: {to: preprocess, steps: {resample: {spacing: 1}}}\n",
    IO + "convert: {to: preprocess, steps: [{resample: {spacing: 1}, clip: {range: [0, 1]}}]}\n",
    IO + "convert: {to: preprocess, steps: [{resample: {spacing: 1, shape: [1, 2, 3]}}, "
         "{normalize: {method: window, preset: lungs}}], nan: drop, labels: [1], labels_root: x}\n",
    IO + "convert: {to: preprocess, steps: [{resample: {spacing: [1, 2], order: 9}}, {clip: {percentiles: x}}]}\n",
    IO + "convert: {to: [numpy]}\n",
    IO + "convert: {to: 5}\n",
    "input: {root: raw, identity: sha}\noutput: {root: out}\nconvert: {to: numpy}\nmemory_budget: lots\n"
    "version: 2\nlog: [a]\n",
    IO + "convert: {to: numpy}\ncluster: {slurm: {time: soon, mem: lots, sbatch: [account=lab], "
         "job_name: 'my job', shards: 0}, jobqueue: {cores: x, walltime: 5, job_extra_directives: -x}}\n",
    IO + "convert: {to: numpy}\ncluster: slurm\n",
    IO + "convert: {to: numpy}\ncluster: {slurm: [1], jobqueue: 3}\n",
    "inputs: {root: raw}\noutput: {root: out, mirror: true}\nconvert: {to: numpy}\n",
    "input: [raw]\noutput: 5\nconvert: []\njobs: 1.5\n",
]
KEY = re.compile(r"[a-z_]+(\.[a-z_]+|\[\d+\])*")
CODE_WORDS = re.compile(r"\b[A-Z][a-z0-9]+[A-Z]\w*|model|dict_type|Input should|Field required|Extra inputs"
                        r"|instance of|tuple\[|literal\[|function-|constrained|\(\)")


def test_no_message_names_the_code_and_every_key_is_a_path(tmp_path):
    seen = 0
    for i, text in enumerate(CORPUS):
        for key, message in problems(tmp_path / str(i), text):
            seen += 1
            assert KEY.fullmatch(key), (key, text)
            parts = re.split(r"\.|(?=\[)", key)
            assert all(a != b for a, b in zip(parts, parts[1:])), (key, text)  # no repeated segment
            assert not CODE_WORDS.search(message), (message, text)
            assert message.count("found") <= 1, (message, text)  # what was found, said once
    assert seen >= 60


def test_plain_functions_and_the_command_line_use_the_same_words(tmp_path):
    with pytest.raises(ConfigError) as info:
        preprocess_volume(tmp_path / "a.nii", tmp_path / "a.npz", [{"crop_pad": {"shape": [96, 112]}}, "resample"])
    assert info.value.errors == [
        ("steps[0].crop_pad.shape", "expected a list of 3 numbers, found 2"),
        ("steps[1]", "expected resample: {spacing, shape, order, antialias}, found 'resample' alone")]
    with pytest.raises(ConfigError) as info:
        parse_options({"to": "slices", "plane": ["axial"]}, where="options")
    assert (info.value.where, info.value.message) == ("options.plane", "unknown key 'plane'; did you mean 'planes'?")
    cfg = write_config(tmp_path, IO + "convert: {to: numpy}\n")
    proc = niconv("submit", cfg, "--slurm", "--dry-run", "--cpus", "0", "--mem", "lots")
    assert proc.returncode == 2
    assert proc.stderr == ("niconv: error: command line: --mem: expected a SLURM memory size like '8G' or '500M', "
                           "found 'lots'; --cpus: expected a whole number of at least 1, found 0\n")


def test_one_model_base_and_one_hint_for_every_part_of_a_config():
    from niconv import config, preprocess_steps
    from niconv.converters import get, names
    from niconv.converters import slices

    models = [config.Config, config.InputSpec, config.OutputSpec, config.ClusterOptions, config.SlurmOptions,
              config.JobqueueOptions, slices.LevelWidth, preprocess_steps.ResampleOptions,
              *(get(name).options for name in names())]
    assert all(issubclass(m, ConfigModel) and m.model_config["extra"] == "forbid" and m.model_config["frozen"]
               for m in models)
    assert did_you_mean("exlude", ["include", "exclude"]) == "; did you mean 'exclude'?"
    assert did_you_mean("zzz", ["include", "exclude"]) == ""
    with pytest.raises(ConfigError) as info:
        validated(SlurmOptions, {"cpus": 0}, prefix="cluster.slurm")
    assert info.value.errors == [("cluster.slurm.cpus", "expected a whole number of at least 1, found 0")]
