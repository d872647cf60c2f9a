"""Damaged logs: a lost header, an unbalanced quote, bytes that are no text, rows run together.

A damaged line costs only the task whose row it was: resume redoes that task and
no other, every command counts the lines it skipped, and ``verify`` checks the
latest row of each output.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from niconv.log import COLUMNS, CsvLog, TaskResult, read_log, read_rows
from helpers import niconv, write_config

NAMES = {"a/dipy_aniso_vox.nii.gz": "dipy_aniso_vox.nii.gz", "a/sct_t2s.nii.gz": "sct_t2s.nii.gz",
         "b/nib_anatomical.nii": "nib_anatomical.nii", "b/nib_functional.nii": "nib_functional.nii",
         "b/nib_minc1_1_scale.mnc": "nib_minc1_1_scale.mnc"}


def lines(data: bytes) -> list[bytes]:
    """The physical lines of a log, each with its line end."""
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def task_of(line: bytes) -> str:
    return line.split(b",", 1)[0].decode()


def first_run(cohort, tmp_path, watch=None):
    """A finished run over five real images: (config, log, its header line, its five row lines).

    ``watch`` (the ``frozen_inputs`` fixture) watches the input tree from before the run."""
    for rel, name in NAMES.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cohort / name, tmp_path / "in" / rel)
    if watch is not None:
        watch(tmp_path / "in")
    cfg = write_config(tmp_path, "input:\n  root: in\noutput:\n  root: out\njobs: 1\nconvert:\n  to: numpy\n")
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0 and "5 converted, 0 already done" in first.stdout, first.stderr
    log = tmp_path / "out" / "niconv_log.csv"
    header, *rows = lines(log.read_bytes())
    assert len(rows) == 5
    return cfg, log, header, rows


@pytest.fixture
def done(cohort, tmp_path, frozen_inputs):
    """:func:`first_run`, its input tree frozen."""
    return first_run(cohort, tmp_path, frozen_inputs)


def appended(log, before: int) -> list[str]:
    """Task ids of the rows a rerun appended after the first ``before`` readable rows."""
    return [r["task_id"] for r in read_log(log).rows[before:]]


def test_a_log_that_lost_its_header_keeps_its_rows_and_resume_redoes_only_the_lost_ones(done):
    cfg, log, header, rows = done
    # emptied mid-run: the header and the first two rows are gone, the rows written after follow from byte 0
    log.write_bytes(b"".join(rows[2:]))
    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "niconv: 2 converted, 3 already done, 0 skipped, 0 failed in" in rerun.stdout
    assert "damaged" not in rerun.stdout
    assert appended(log, 3) == [task_of(r) for r in rows[:2]]
    logged = read_log(log)
    assert (logged.header_recovered, logged.damaged_lines, len(logged.rows)) == (True, 0, 5)

    plan = niconv("plan", cfg)
    assert "5 task(s): 0 pending, 5 done, 0 failed earlier" in plan.stderr and "damaged" not in plan.stderr
    assert "0 converted, 5 already done" in niconv("run", cfg, "--quiet").stdout
    verify = niconv("verify", log)
    assert verify.returncode == 0 and verify.stdout == "niconv: 5 of 5 outputs match the log\n"


def test_an_unbalanced_quote_costs_only_its_own_row(done):
    cfg, log, header, rows = done
    rows[1] = rows[1].replace(b",ok,", b',"ok,', 1)  # its quote never closes
    log.write_bytes(header + b"".join(rows))
    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert ("niconv: 1 converted, 4 already done, 0 skipped, 0 failed, 1 damaged log line(s) skipped in"
            in rerun.stdout)
    assert appended(log, 4) == [task_of(rows[1])]
    record = json.loads((log.parent / "niconv_log.run.json").read_text())
    assert record["log_damaged_lines"] == 1 and record["counts"]["converted"] == 1

    # the damaged line stays in the log: every reader still skips it, and says so
    again = niconv("run", cfg, "--quiet")
    assert "0 converted, 5 already done, 0 skipped, 0 failed, 1 damaged log line(s) skipped" in again.stdout
    plan = niconv("plan", cfg)
    assert "5 task(s): 0 pending, 5 done" in plan.stderr and "niconv: 1 damaged log line(s) skipped" in plan.stderr
    status = niconv("status", cfg)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("5 tasks: 5 done, 0 failed, 0 pending")
    assert "\n1 damaged log line(s) skipped\n" in status.stdout
    verify = niconv("verify", log)
    assert verify.returncode == 0
    assert verify.stdout == "niconv: 5 of 5 outputs match the log; 1 damaged log line(s) skipped\n"

    merged = niconv("merge", cfg, "--output", log.parent / "merged.csv")
    assert merged.returncode == 0 and "; 1 damaged log line(s) left out" in merged.stdout
    clean = read_log(log.parent / "merged.csv")
    assert (clean.damaged_lines, len(clean.rows)) == (0, 5)


def test_bytes_that_are_no_text_cost_only_their_lines(done):
    cfg, log, header, rows = done
    rows[2] = rows[2].replace(b",ok,", b",\xff\xfe\x00,", 1)          # a row whose status is binary junk
    junk = b"\x1f\x8b\x08\x00\xff\xd8\xff\xe0 \x00\x00\"\x9c\n"        # a line of bytes that is no row at all
    log.write_bytes(header + b"".join(rows[:4]) + junk + rows[4])
    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 converted, 4 already done, 0 skipped, 0 failed, 2 damaged log line(s) skipped" in rerun.stdout
    assert appended(log, 4) == [task_of(rows[2])]
    verify = niconv("verify", log)
    assert verify.returncode == 0 and "5 of 5 outputs match the log; 2 damaged log line(s) skipped" in verify.stdout


def test_a_quoted_line_break_in_a_path_is_a_row_and_a_damaged_line_before_it_is_not(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    names = {"a_first.nii.gz": "dipy_aniso_vox.nii.gz", "b_line\nbreak.nii.gz": "sct_t2s.nii.gz",
             "c_last.nii": "nib_anatomical.nii"}
    for name, source in names.items():
        shutil.copy(cohort / source, tmp_path / "in" / name)
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input:\n  root: in\noutput:\n  root: out\njobs: 1\nconvert:\n  to: numpy\n")
    assert "3 converted" in niconv("run", cfg, "--quiet").stdout
    log = tmp_path / "out" / "niconv_log.csv"
    header, *rest = lines(log.read_bytes())
    assert len(rest) == 5  # a, the three lines of b (input and output paths break), c
    first = rest[0]
    rest[0] = first.replace(b",ok,", b',"ok,', 1)
    log.write_bytes(header + b"".join(rest))

    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 converted, 2 already done, 0 skipped, 0 failed, 1 damaged log line(s) skipped" in rerun.stdout
    assert appended(log, 2) == [task_of(first)]
    by_input = {r["input_path"]: r for r in read_log(log).rows}
    kept = by_input[str(tmp_path / "in" / "b_line\nbreak.nii.gz")]
    assert kept["status"] == "ok" and kept["output_path"] == str(tmp_path / "out" / "b_line\nbreak.npz")
    assert np.load(kept["output_path"])["data"].shape == (49, 54, 9)


def test_verify_on_a_log_without_a_readable_row_is_an_error(done):
    cfg, log, header, rows = done
    log.write_bytes(b'"unbalanced,quote\nnot,a,row\n' + rows[0][:40] + b"\n")  # no header, nothing readable
    proc = niconv("verify", log)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"niconv: error: {log}: expected log rows to verify against, found none "
                           f"(3 damaged log line(s) skipped)\n")
    log.write_bytes(header)
    proc = niconv("verify", log)
    assert proc.returncode == 1
    assert "expected log rows to verify against, found none (an empty log or only a header)" in proc.stderr


def test_verify_checks_the_latest_row_of_each_output(cohort, tmp_path, frozen_inputs):
    cfg, log, header, rows = first_run(cohort, tmp_path)
    # the input changes (another real image under the same name): its output is redone under a new task id
    changed = tmp_path / "in" / "a" / "sct_t2s.nii.gz"
    changed.unlink()
    shutil.copy(cohort / "sct_fmri_tsnr.nii.gz", changed)
    frozen_inputs(tmp_path / "in")
    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0 and "1 converted, 4 already done" in rerun.stdout
    out = str(tmp_path / "out" / "a" / "sct_t2s.npz")
    same_output = [r for r in read_rows(log) if r["output_path"] == out]
    assert len(same_output) == 2 and same_output[0]["task_id"] != same_output[1]["task_id"]
    assert same_output[0]["sha256"] != same_output[1]["sha256"]

    verify = niconv("verify", log)
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout == "niconv: 5 of 5 outputs match the log\n"
    data = bytearray(open(out, "rb").read())
    data[-30] ^= 0xFF
    open(out, "wb").write(bytes(data))
    verify = niconv("verify", log)
    assert verify.returncode == 1
    assert verify.stdout == (f"differs  {out}\nniconv: 4 of 5 outputs match the log; 1 missing or different "
                             "(`niconv run CONFIG --verify` redoes them)\n")


def test_a_newer_log_with_more_columns_resumes_and_keeps_them(done):
    cfg, log, header, rows = done
    # a later niconv wrote one more column after ours; this one appends rows with its own columns
    log.write_bytes(header.replace(b"\r\n", b",gpu_seconds\r\n")
                    + b"".join(r.replace(b"\r\n", b",0.5\r\n") for r in rows[:4]))
    rerun = niconv("run", cfg, "--quiet")
    assert rerun.returncode == 0 and "1 converted, 4 already done, 0 skipped, 0 failed in" in rerun.stdout
    logged = read_log(log)
    assert logged.damaged_lines == 0 and [r["gpu_seconds"] for r in logged.rows] == ["0.5"] * 4 + [""]
    assert [r["task_id"] for r in logged.rows] == [task_of(r) for r in rows]


def result(task_id: str, status: str = "ok", path: str = "/in/x.nii.gz") -> TaskResult:
    return TaskResult(task_id=task_id, status=status, converter="numpy", input_path=path,
                      output_path=f"/out/{task_id}.npz", bytes_out=1234, sha256="ab" * 32 if status == "ok" else "")


def test_read_log_skips_each_damaged_line_alone(tmp_path):
    log = tmp_path / "log.csv"
    with CsvLog(log) as w:
        for r in (result("t1"), result("t2", path="/in/line\nbreak, \"quoted\".nii.gz"), result("t3"),
                  result("t4", "failed"), result("t5"), result("t6", "skipped")):
            w.append(r)
    header, t1, t2a, t2b, t3, t4, t5, t6 = lines(log.read_bytes())
    assert t2a.count(b'"') % 2 == 1  # the path's line break splits its row over two lines
    damaged = [
        t3.replace(b",ok,", b',"ok,'),         # unbalanced quote
        t4.rstrip(b"\r\n") + t5,               # two rows run together (a lost line end)
        t5[: len(t5) // 2] + b"\n",            # a row cut short
        b"\xff\xfe\xfd\n",                     # not text
        t1.replace(b"ab" * 32, b"ab" * 31),    # an ok row without a full sha256
        b"\r\n",                               # a blank line: no row, not counted
    ]
    cut = t6.rstrip(b"\r\n")                   # a last line without its line end: a write cut short
    log.write_bytes(header + t1 + damaged[0] + t2a + t2b + b"".join(damaged[1:]) + t6 + cut)
    logged = read_log(log)
    assert [r["task_id"] for r in logged.rows] == ["t1", "t2", "t6"]
    assert logged.rows[1]["input_path"] == "/in/line\nbreak, \"quoted\".nii.gz"
    assert (logged.damaged_lines, logged.header_recovered) == (6, False)
    assert read_rows(log) == logged.rows and set(logged.rows[0]) == set(COLUMNS)

    # an older header (ours without the columns added since) is a header; a garbled one is not
    older = b",".join(c.encode() for c in COLUMNS[:-1]) + b"\r\n"
    log.write_bytes(older + t1.replace(b",\r\n", b"\r\n") + t6)
    logged = read_log(log)
    assert [r["task_id"] for r in logged.rows] == ["t1", "t6"] and logged.rows[0]["details"] == ""
    assert (logged.damaged_lines, logged.header_recovered) == (0, False)
    log.write_bytes(b"task_id,stat\xffus\r\n" + t1)
    logged = read_log(log)
    assert ([r["task_id"] for r in logged.rows], logged.damaged_lines, logged.header_recovered) == (["t1"], 1, True)
    (tmp_path / "empty.csv").write_bytes(b"")
    assert read_log(tmp_path / "absent.csv") == read_log(tmp_path / "empty.csv") == type(logged)()
