"""The commands a new user meets: validate, plan, run's summary and progress, status, verify, --help."""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from helpers import dicom_report, niconv, rows_of, sha256, write_config

# a DICOM object that is not an image (a structured report) is skipped, its SOP class named
REPORT = "not an image: Basic Text SR Storage (1.2.840.10008.5.1.4.1.1.88.11); niconv converts image series"


def report_label(number: int) -> str:
    return f"series {number} SR 'report', 1 file"


def fill(folder: Path, cohort: Path, names) -> Path:
    """Copies of real cohort files (name -> cohort name, or a list of cohort names)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
    for name, source in pairs:
        shutil.copy(cohort / source, folder / name)
    return folder


def numpy_config(folder: Path, extra: str = "") -> Path:
    return write_config(folder, f"input: {{root: in}}\noutput: {{root: out}}\njobs: 1\n{extra}convert: {{to: numpy}}\n")


def record_of(folder: Path) -> dict:
    return json.loads((folder / "out" / "niconv_log.run.json").read_text())


# ---------------------------------------------------------------- validate rejects what plan rejects


def _same_stem(tmp, cohort):
    fill(tmp / "in", cohort, {"a.nii": "nib_anatomical.nii", "a.nii.gz": "dipy_aniso_vox.nii.gz"})
    return numpy_config(tmp), "output: 1 output(s) would be written by more than one input"


def _missing_root(tmp, cohort):
    return (write_config(tmp, "input: {root: nothere}\noutput: {root: out}\nconvert: {to: numpy}\n"),
            f"input.root: expected an existing folder, found nothing at {tmp / 'nothere'}")


def _log_is_an_input(tmp, cohort):
    fill(tmp / "in", cohort, ["dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz"])
    return (numpy_config(tmp, "log: in/sct_t2s.nii.gz\n"),
            f"{tmp / 'in' / 'sct_t2s.nii.gz'}: the log (config key 'log') is an input of this run")


def _outputs_into_the_input_tree(tmp, cohort):
    fill(tmp / "in", cohort, ["dipy_aniso_vox.nii.gz"])
    cfg = write_config(tmp, "input: {root: in}\noutput: {root: in}\nconvert:\n  to: preprocess\n  format: nifti\n"
                            "  steps:\n    - normalize: {method: zscore}\n")
    return cfg, "would match input.include, so the next run would convert them again"


def _self_pairing(tmp, cohort):
    fill(tmp / "in", cohort, ["sct_t2s.nii.gz"])
    cfg = write_config(tmp, "input: {root: in}\noutput: {root: out}\nconvert:\n  to: preprocess\n  labels: '{name}'\n")
    return cfg, "convert.labels: the pattern '{name}' pairs 1 input(s) with themselves"


@pytest.mark.parametrize("case", [_missing_root, _same_stem, _log_is_an_input, _outputs_into_the_input_tree,
                                  _self_pairing], ids=lambda f: f.__name__.strip("_"))
def test_validate_rejects_what_plan_rejects_in_the_same_words(cohort, tmp_path, frozen_inputs, case):
    cfg, words = case(tmp_path, cohort)
    if (tmp_path / "in").exists():
        frozen_inputs(tmp_path / "in")
    validate, plan = niconv("validate", cfg), niconv("plan", cfg)
    assert (validate.returncode, validate.stdout) == (2, "")
    assert (plan.returncode, plan.stdout) == (2, "")
    assert validate.stderr == plan.stderr and words in validate.stderr
    assert validate.stderr.startswith("niconv: error: ") and "Traceback" not in validate.stderr
    assert not (tmp_path / "out").exists()


def test_validate_of_a_good_config_counts_its_inputs(cohort, tmp_path, frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz", "pydicom_MR_small.dcm"]))
    proc = niconv("validate", numpy_config(tmp_path))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (f"niconv: {tmp_path / 'config.yaml'} is valid (2 input(s), to: numpy, "
                           f"output: {tmp_path / 'out'})\n")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- skipped stays skipped; files/s


def test_skipped_inputs_stay_skipped_in_plan_run_rerun_and_status(cohort, tmp_path, frozen_inputs):
    inputs = fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz", "nib_example4d.nii.gz"])
    reports = [dicom_report(inputs / "sr1" / "report.dcm", 1).parent, dicom_report(inputs / "sr2" / "IM0001", 2).parent]
    frozen_inputs(inputs)
    cfg = numpy_config(tmp_path)

    def assert_plan(done: int):
        plan = niconv("plan", cfg)
        assert plan.returncode == 0
        states = {ln.split()[2]: ln.split()[1] for ln in plan.stdout.splitlines()}
        assert states == {str(tmp_path / "in" / "dipy_aniso_vox.nii.gz"): "done" if done else "pending",
                          str(tmp_path / "in" / "nib_example4d.nii.gz"): "done" if done else "pending",
                          **{str(d): "skipped" for d in reports}}
        for i, d in enumerate(reports, 1):
            assert f"  skipped  {d} [{report_label(i)}] ({REPORT})\n" in plan.stdout
        assert "report.npz" not in plan.stdout
        assert plan.stderr == (f"niconv: 4 task(s): {2 - done} pending, {done} done, 0 failed earlier, "
                               "2 skipped\n")

    assert_plan(done=0)  # before any run: the plan already says what the run will do
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0 and first.stdout.startswith("niconv: 2 converted, 0 already done, 2 skipped, 0 failed in ")
    again = niconv("run", cfg, "--quiet")
    assert again.returncode == 0
    assert again.stdout.startswith("niconv: 0 converted, 2 already done, 2 skipped, 0 failed in ")
    assert record_of(tmp_path)["counts"] == {"converted": 0, "skipped": 2, "failed": 0, "already_done": 2,
                                             "failed_before": 0}
    assert_plan(done=2)
    table = list(csv.DictReader(io.StringIO(niconv("plan", cfg, "--csv").stdout)))
    assert {r["input_path"]: (r["state"], r["output_path"]) for r in table if "/sr" in r["input_path"]} == {
        str(d): ("skipped", "") for d in reports}
    status = niconv("status", cfg)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("4 tasks: 2 done, 0 failed, 0 pending, 2 skipped (1 log file(s) beside ")


def test_files_per_second_counts_converted_files_only(cohort, tmp_path, frozen_inputs):
    inputs = tmp_path / "in"
    dicom_report(inputs / "sr1" / "report.dcm", 1), dicom_report(inputs / "sr2" / "report.dcm", 2)
    (inputs / "cut.nii.gz").write_bytes((cohort / "dipy_aniso_vox.nii.gz").read_bytes()[:3000])
    frozen_inputs(inputs)
    cfg = numpy_config(tmp_path)
    nothing = niconv("run", cfg, "--quiet")
    assert nothing.returncode == 1
    assert nothing.stdout.startswith("niconv: 0 converted, 0 already done, 2 skipped, 1 failed in ")
    assert "files/s" not in nothing.stdout  # nothing converted: no rate
    assert record_of(tmp_path)["files_per_second"] == 0

    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "more.nii.gz")
    cfg = write_config(tmp_path, "input: {root: [in, more]}\noutput: {root: out2}\njobs: 1\nconvert: {to: numpy}\n")
    (tmp_path / "more").mkdir()
    shutil.move(tmp_path / "more.nii.gz", tmp_path / "more" / "more.nii.gz")
    one = niconv("run", cfg, "--quiet")
    assert one.stdout.startswith("niconv: 1 converted, 0 already done, 2 skipped, 1 failed in ")
    record = json.loads((tmp_path / "out2" / "niconv_log.run.json").read_text())
    assert record["files_per_second"] == pytest.approx(1 / record["conversion_seconds"], rel=0.02)
    assert f"({record['files_per_second']:.1f} files/s converting)" in one.stdout


# ---------------------------------------------------------------- progress off a terminal


def test_progress_off_a_terminal_is_plain_lines_and_the_summary(cohort, tmp_path, frozen_inputs):
    inputs = fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz", "nib_example4d.nii.gz", "sct_t2s.nii.gz"])
    frozen_inputs(dicom_report(inputs / "report.dcm").parent)
    proc = niconv("run", numpy_config(tmp_path))  # stderr is a pipe, as in a log file or under a scheduler
    assert proc.returncode == 0
    assert "\r" not in proc.stderr + proc.stdout
    assert proc.stderr == ""  # a run this short has no progress line, only the summary
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("niconv: 3 converted, 0 already done, 1 skipped")


def test_progress_lines_come_every_fraction_of_the_tasks(cohort, tmp_path, frozen_inputs, monkeypatch, capsys):
    from niconv import runner
    from niconv.config import load_config
    from niconv.scan import build_manifest

    inputs = fill(tmp_path / "in", cohort, {f"s{i}.nii.gz": "dipy_aniso_vox.nii.gz" for i in range(7)})
    frozen_inputs(dicom_report(inputs / "x.dcm").parent)
    config = load_config(numpy_config(tmp_path))
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(runner, "PROGRESS_FRACTION", 0.25)
    summary = runner.run(config, build_manifest(config), jobs=1, progress=True)
    assert (summary.converted, summary.skipped) == (7, 1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3, err  # at 2, 4 and 6 of 8 tasks; none at the end: the summary follows
    for line, done in zip(lines, (2, 4, 6)):
        m = re.fullmatch(rf"niconv: {done} of 8 tasks \({100 * done // 8}%\): (\d) converted, (\d) skipped, "
                         r"0 failed in 0:\d\d, [\d.]+ files/s", line)
        assert m and int(m.group(1)) + int(m.group(2)) == done, line


def test_progress_lines_are_as_rare_as_the_rarer_of_time_and_fraction():
    from niconv.runner import _Lines

    now = [0.0]
    out = io.StringIO()
    lines = _Lines(100, out, clock=lambda: now[0])

    def at(seconds: float, done: int) -> int:
        now[0] = seconds
        lines.update({"ok": done, "skipped": 0, "failed": 0})
        return out.getvalue().count("\n")

    assert at(10, 10) == 0  # 10% done, but only 10 s
    assert at(31, 11) == 1  # 30 s and 5% since the start
    assert out.getvalue() == "niconv: 11 of 100 tasks (11%): 11 converted, 0 skipped, 0 failed in 0:31, 0.4 files/s\n"
    assert at(40, 40) == 1  # 29% more, but 9 s
    assert at(62, 41) == 2
    assert at(200, 45) == 2  # 138 s, but 4% more
    assert at(201, 46) == 3
    assert at(500, 100) == 3  # the last task: the run's summary says it


def test_progress_on_a_terminal_is_a_bar(cohort, tmp_path, frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz"]))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "niconv", "run", numpy_config(tmp_path)], stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    assert b"\r" in seen and b"2/2" in seen and b"100%" in seen
    assert proc.stdout.read().startswith("niconv: 2 converted")


# ---------------------------------------------------------------- a reader that goes away; --help


@pytest.mark.parametrize("args", [("plan", "CFG"), ("plan", "CFG", "--csv"), ("info", "IMAGES")])
def test_a_reader_that_stops_reading_ends_the_command_quietly(cohort, tmp_path, frozen_inputs, args):
    frozen_inputs(fill(tmp_path / "in", cohort, {f"s{i:03d}.nii.gz": "sct_t2s.nii.gz" for i in range(200)}))
    cfg = numpy_config(tmp_path)
    images = sorted(str(p) for p in (tmp_path / "in").iterdir())
    argv = [a for arg in args for a in ({"CFG": [str(cfg)], "IMAGES": images}.get(arg, [arg]))]
    # `niconv ... | head`: the reader is gone before niconv writes
    proc = subprocess.Popen([sys.executable, "-m", "niconv", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
    assert not (tmp_path / "out").exists()


def test_every_command_and_option_has_help(cohort):
    from niconv.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) >= {"run", "plan", "validate", "init", "info", "verify", "submit", "status", "merge"}
    for name, parser in commands.items():
        assert parser.description and "\n" not in parser.description.strip(), name
        for action in parser._actions:
            assert action.help, f"niconv {name}: {action.dest} has no help"
    status = niconv("status", "--help")
    assert status.returncode == 0
    assert status.stdout.split("\n\n")[1] == "Count the done, failed, pending and skipped tasks across all shard logs."
    assert "config      the YAML config file" in status.stdout
    run = niconv("run", "--help").stdout
    assert "--verify" in run and "--quiet" in run and "no progress (bar on a terminal" in " ".join(run.split())


# ---------------------------------------------------------------- run --verify redoes what verify found


def test_run_verify_redoes_exactly_the_missing_and_changed_outputs(cohort, tmp_path, frozen_inputs):
    inputs = fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz", "nib_example4d.nii.gz", "sct_t2s.nii.gz"])
    frozen_inputs(dicom_report(inputs / "report.dcm").parent)
    cfg = numpy_config(tmp_path)
    out, log = tmp_path / "out", tmp_path / "out" / "niconv_log.csv"
    assert niconv("run", cfg, "--quiet").returncode == 0
    original = {p.name: sha256(p) for p in out.glob("*.npz")}
    ids = {Path(r["output_path"]).name: r["task_id"] for r in rows_of(log)}

    changed, gone = out / "nib_example4d.npz", out / "sct_t2s.npz"
    data = bytearray(changed.read_bytes())
    data[-30] ^= 0xFF  # same size: a plain rerun cannot see it
    changed.write_bytes(bytes(data))
    plain = niconv("run", cfg, "--quiet")
    assert plain.stdout.startswith("niconv: 0 converted, 3 already done, 1 skipped")
    gone.unlink()

    verify = niconv("verify", log)
    assert verify.returncode == 1
    assert f"differs  {changed}\n" in verify.stdout and f"missing  {gone}\n" in verify.stdout
    assert "2 missing or different (`niconv run CONFIG --verify` redoes them)" in verify.stdout

    rows_before = len(rows_of(log))
    redo = niconv("run", cfg, "--verify", "--quiet")
    assert redo.returncode == 0, redo.stderr
    assert redo.stdout.startswith("niconv: 2 converted, 1 already done, 1 skipped, 0 failed, "
                                  "2 redone (output missing or changed) in ")
    assert sorted(r["task_id"] for r in rows_of(log)[rows_before:]) == sorted(
        [ids["nib_example4d.npz"], ids["sct_t2s.npz"]])
    assert {p.name: sha256(p) for p in out.glob("*.npz")} == original  # the same bytes again
    assert niconv("verify", log).stdout == "niconv: 3 of 3 outputs match the log\n"
    again = niconv("run", cfg, "--verify", "--quiet")
    assert again.stdout.startswith("niconv: 0 converted, 3 already done, 1 skipped, 0 failed in ")
