"""Config validation, `niconv validate`, `init` and `info`."""
from __future__ import annotations

import pytest
import yaml

from niconv import converters
from niconv.config import load_config
from niconv.errors import ConfigError
from helpers import REPO, niconv, write_config


def test_validate_reports_every_problem_with_key_paths(tmp_path):
    cfg = write_config(tmp_path, """
input: {root: raw, exlude: ["x"]}
output: {}
jobs: 0
convert: {to: numpy, compresed: true}
""")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    problems = dict(info.value.errors)
    assert problems["input.exlude"] == "unknown key 'exlude'; did you mean 'exclude'?"
    assert problems["output.root"] == "required key is missing"
    assert problems["jobs"] == "expected a whole number of at least 1, found 0"
    assert problems["convert.compresed"] == "unknown key 'compresed'; did you mean 'compressed'?"
    proc = niconv("validate", cfg)
    assert proc.returncode == 2
    assert "4 problem(s)" in proc.stderr and str(cfg) in proc.stderr


def test_unknown_converter_name_hint(tmp_path):
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpi}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert dict(info.value.errors)["convert.to"].endswith("found 'numpi'; did you mean 'numpy'?")


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg", "input: {root: ../raw}\noutput: {root: out}\nconvert: {to: numpy}\n")
    monkeypatch.chdir("/")
    c = load_config(cfg)
    assert c.input.root == [tmp_path / "raw"]
    assert c.output.root == tmp_path / "cfg" / "out"
    assert c.log_path == tmp_path / "cfg" / "out" / "niconv_log.csv"


def test_yaml_syntax_error_names_the_line(tmp_path):
    cfg = write_config(tmp_path, "input:\n  root: [raw\noutput: {root: out}\n")
    proc = niconv("validate", cfg)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and ".yaml:" in proc.stderr


@pytest.mark.parametrize("name", converters.names())
def test_init_prints_a_valid_commented_config(tmp_path, name):
    proc = niconv("init", "--to", name)
    assert proc.returncode == 0 and proc.stdout.startswith("#")
    data = yaml.safe_load(proc.stdout)
    assert data["convert"]["to"] == name
    (tmp_path / "c.yaml").write_text(proc.stdout)
    assert load_config(tmp_path / "c.yaml").convert.to == name


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config, cohort):
    assert niconv("validate", config).returncode == 0


def test_info_prints_what_a_user_checks(cohort):
    proc = niconv("info", cohort / "nib_functional.nii", cohort / "fs_brainmask.mgz")
    assert proc.returncode == 0
    out = proc.stdout
    assert "Nifti1Image" in out and "(17, 21, 3, 20)" in out
    assert "stored int16, loaded as float32 (scaled)" in out
    assert "4 x 4 x 8 mm, 2 sec" in out and "scl_slope=0.0754" in out
    assert "qform_code=" in out and "orientation  LAS" in out
    assert "MGHImage" in out and "orientation  LIA" in out


def test_info_on_a_missing_file_exits_1(tmp_path):
    proc = niconv("info", tmp_path / "none.nii")
    assert proc.returncode == 1 and "file not found" in proc.stderr


def test_usage_error_exit_2():
    assert niconv("run").returncode == 2
    assert niconv("run", "x.yaml", "--shard", "5/4").returncode == 2
