"""Splits of a training set: hash-based assignment (stable under reruns and added subjects),
fractions, folds, stratification, and the `dataset:` config section's messages."""
from __future__ import annotations

from collections import Counter

import pytest

from helpers import write_config
from niconv.config import load_config
from niconv.dataset import assign_splits, unit_hash
from niconv.errors import ConfigError

NAMES = [f"sub-{i:03d}" for i in range(200)]


def test_unit_hash_is_fixed_and_in_the_unit_interval():
    # the value is part of the contract: the same subject gets the same split on any machine, forever
    assert unit_hash(0, "sub-000") == int.from_bytes(__import__("hashlib").sha256(b"0\0sub-000").digest()[:8],
                                                     "big") / 2.0 ** 64
    values = [unit_hash(0, n) for n in NAMES]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == 200


def test_fractions_are_near_the_asked_ones_on_200_subjects():
    got = Counter(s for s, _ in assign_splits(NAMES, val=0.2, test=0.1, seed=0).values())
    assert sum(got.values()) == 200
    # binomial spread for 200 draws is about 4-6 subjects; 3 of it allowed
    assert abs(got["val"] - 40) <= 17
    assert abs(got["test"] - 20) <= 13
    assert abs(got["train"] - 140) <= 20


def test_a_subject_keeps_its_split_when_subjects_are_added():
    before = assign_splits(NAMES, val=0.2, test=0.1, seed=3)
    more = NAMES + [f"new-{i}" for i in range(80)]
    after = assign_splits(more, val=0.2, test=0.1, seed=3)
    assert {k: after[k] for k in NAMES} == before
    # and under reruns
    assert assign_splits(list(reversed(NAMES)), val=0.2, test=0.1, seed=3) == before


def test_folds_cover_every_non_test_subject_once_and_stay_under_added_subjects():
    before = assign_splits(NAMES, folds=5, test=0.1, seed=0)
    folds = Counter(f for s, f in before.values() if s == "train")
    tests = [k for k, (s, f) in before.items() if s == "test"]
    assert set(folds) == {0, 1, 2, 3, 4}
    assert sum(folds.values()) + len(tests) == 200
    assert all(f is None for k, (s, f) in before.items() if s == "test")
    assert not any(s == "val" for s, _ in before.values())
    assert all(abs(n - 36) <= 17 for n in folds.values())
    after = assign_splits(NAMES + [f"new-{i}" for i in range(50)], folds=5, test=0.1, seed=0)
    assert {k: after[k] for k in NAMES} == before


def test_the_seed_changes_the_assignment():
    a = assign_splits(NAMES, val=0.2, seed=0)
    b = assign_splits(NAMES, val=0.2, seed=1)
    assert a != b
    assert sum(a[k] != b[k] for k in NAMES) > 20


def test_stratified_fractions_hold_within_each_stratum():
    strata = {n: ("siteA", "siteB", "siteC")[i % 3] for i, n in enumerate(NAMES[:120])}
    got = assign_splits(NAMES[:120], val=0.25, test=0.1, seed=0, strata=strata)
    for site in ("siteA", "siteB", "siteC"):
        counts = Counter(got[k][0] for k in strata if strata[k] == site)
        # 40 per site: positions (i + 0.5) / 40 below 0.1 -> 4 test, below 0.35 -> 10 val
        assert counts == {"test": 4, "val": 10, "train": 26}


def test_stratified_folds_are_balanced_within_each_stratum():
    strata = {n: ("a", "b")[i % 2] for i, n in enumerate(NAMES[:100])}
    got = assign_splits(NAMES[:100], folds=5, seed=0, strata=strata)
    for s in ("a", "b"):
        assert Counter(got[k][1] for k in strata if strata[k] == s) == {0: 10, 1: 10, 2: 10, 3: 10, 4: 10}


# ---------------------------------------------------------------- the config section


def _config(tmp_path, dataset: str, to: str = "preprocess") -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    return write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: out}}\nconvert: {{to: {to}}}\n{dataset}")


def _problems(path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_a_misspelled_key_is_named_with_a_hint(tmp_path):
    errors = _problems(_config(tmp_path, "dataset:\n  split: {vall: 0.2}\n"))
    assert any(key == "dataset.split.vall" and "did you mean 'val'" in msg for key, msg in errors), errors


def test_val_and_folds_together_are_refused(tmp_path):
    errors = _problems(_config(tmp_path, "dataset:\n  split: {val: 0.2, folds: 5}\n"))
    assert any(key.startswith("dataset.split") and "val" in msg and "folds" in msg for key, msg in errors), errors


def test_fractions_that_leave_no_training_subject_are_refused(tmp_path):
    errors = _problems(_config(tmp_path, "dataset:\n  split: {val: 0.6, test: 0.5}\n"))
    assert any("below 1" in msg and "0.6 + 0.5" in msg for _, msg in errors), errors


def test_a_fraction_out_of_range_names_key_expected_and_found(tmp_path):
    errors = _problems(_config(tmp_path, "dataset:\n  split: {test: 1.5}\n"))
    (key, msg), = [(k, m) for k, m in errors if k == "dataset.split.test"]
    assert "1.5" in msg


def test_a_split_of_another_converter_is_refused(tmp_path):
    errors = _problems(_config(tmp_path, "dataset:\n  split: {val: 0.2}\n", to="numpy"))
    assert any(key == "dataset" and "convert.to: preprocess" in msg and "numpy" in msg for key, msg in errors), errors


def test_the_stratification_csv_resolves_against_the_config_folder(tmp_path):
    config = load_config(_config(tmp_path, "dataset:\n  split: {val: 0.2, stratify: {csv: sites.csv, column: site}}\n"))
    assert config.dataset.split.stratify.csv == tmp_path / "sites.csv"
    assert config.dataset.split.by == "subject" and config.dataset.split.seed == 0


def test_cohort_scope_with_a_method_without_cohort_statistics_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    path = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert:\n  to: preprocess\n  steps:\n"
                                  "    - normalize: {method: window, preset: brain, scope: cohort}\n")
    errors = _problems(path)
    assert any(key.startswith("convert.steps[0].normalize") and "scope: cohort works with method zscore, minmax, percentile"
               in msg and "window" in msg for key, msg in errors), errors
