"""Training datasets from a ``to: preprocess`` run: splits, cohort statistics, the sample index.

Splits
------
``dataset.split`` assigns each subject (or each sample, ``by: sample``) to
``train``, ``val`` or ``test`` (or to one of ``folds`` folds) by a hash of the
seed and the subject's name mapped to ``[0, 1)``: the same subject gets the same
split on every rerun, on every machine, and when subjects are added. With
``stratify``, the subjects of each stratum (a column of a user's CSV) are ranked
by that hash and the fractions are met within each stratum; a subject then keeps
its split unless subjects are added to its stratum. ``splits.json`` lists them.
A small cohort can leave a split or a fold empty; subjects are not moved to fill
it (that would break the stability), ``plan`` and ``run`` warn instead
(:meth:`Splits.warnings`, kept in the run record's ``warnings``).

Cohort statistics
-----------------
``normalize: {method: zscore, scope: cohort}`` normalizes every sample with one
mean and standard deviation per channel (``minmax``: the lowest and highest
voxel; ``percentile``: the percentiles of the pooled voxels, from each task's
quantiles every 0.1 percentile, so within 0.1 percentile point of the exact
ones), taken over the training split only. They are measured in a first pass
over the training tasks, run through the same dispatch as the conversions: each
task is read and taken through the steps *before* ``normalize`` exactly as the
conversion does (:func:`niconv.converters.preprocess.arrays_before`), and its
per-channel partial sums (count, mean, sum of squared deviations; or min and max)
are appended as a row to a CSV log of their own beside the run's log
(``<log stem>.stats.csv``). A killed first pass is resumed from those rows. The
partials are combined in task-id order (Chan's pairwise formula, float64), so the
statistics do not depend on the number of workers. They become the normalize
step's ``statistics`` option, so the conversion tasks' ids change with them and
outputs made with other statistics are redone.

The index
---------
``dataset.json`` in the output root lists every sample of the log's ``ok`` rows
(format in the README's "Training datasets"): written atomically at the end of
every run and by ``niconv merge``, sorted, byte-identical across reruns and job
counts. ``dataset.json`` and ``splits.json`` are niconv's own files: a plan is
refused when either exists and was not written by niconv
(:func:`niconv.safety.check_run_files`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from . import __version__
from .converters import preprocess
from .errors import ConfigError, NiconvError, OutputError, SkippedInput
from .log import CsvLog, TaskResult, latest_by_task, read_log
from .manifest import Task, task_id
from .ops import intensity as iops
from .paths import resolve_path
from .runfiles import latest_rows, log_files, shard_log_path
from .schema import ConfigModel, did_you_mean
from .text import first_line, fmt_shape
from .volume import image_stem
from .writers import atomic_output, own_file_problem

INDEX_FILE = "dataset.json"
SPLITS_FILE = "splits.json"
INDEX_FORMAT = "niconv-dataset"
INDEX_VERSION = 1
#: Largest dataset.json or splits.json read back to tell whether it is niconv's.
INDEX_MAX_BYTES = 1 << 30
#: Points of each task's quantile grid (every 0.1 percentile) for cohort percentiles.
QUANTILE_GRID = 1001
#: A standard deviation below this divides by 1 instead (as the per-image zscore does).
STD_EPS = 1e-8


# ---------------------------------------------------------------- the config section


class StratifyOptions(ConfigModel):
    """``dataset.split.stratify``: a CSV with a ``subject`` column and the column to stratify by."""

    csv: Path = Field(description="CSV file with a 'subject' column (relative to the config file's folder)")
    column: str = Field(description="the column whose values are the strata, e.g. site or scanner")

    _csv = field_validator("csv", mode="before")(resolve_path)


class SplitOptions(ConfigModel):
    """``dataset.split``: fractions (``val``, ``test``) or ``folds``, the ``seed`` and what is split ``by``."""

    val: Optional[float] = Field(None, ge=0, lt=1, description="fraction of subjects for validation")
    test: float = Field(0.0, ge=0, lt=1, description="fraction of subjects held out for testing")
    folds: Optional[int] = Field(None, ge=2, le=1000, description="cross-validation folds of the non-test subjects")
    seed: int = Field(0, description="changes every assignment; the same seed gives the same splits")
    by: Literal["subject", "sample"] = Field("subject", description="split subjects (default) or single samples")
    stratify: Optional[StratifyOptions] = None

    @model_validator(mode="after")
    def _fractions(self):
        if self.folds is not None and self.val is not None:
            raise ValueError(f"give val (a validation fraction) or folds, not both; found val: {self.val} "
                             f"and folds: {self.folds}")
        if (self.val or 0.0) + self.test >= 1:
            raise ValueError(f"val + test must leave subjects for training (below 1), found "
                             f"{self.val or 0.0} + {self.test}")
        return self


class DatasetOptions(ConfigModel):
    """``dataset:``: how a ``to: preprocess`` run becomes a training set (``split``)."""

    split: Optional[SplitOptions] = Field(None, description="train/val/test fractions or folds (splits.json)")


# ---------------------------------------------------------------- subjects and channels


def sample_names(source, channels: int | None = None) -> tuple[str, list[str] | None]:
    """The subject and channel names of a sample: the one place they are read.

    Parameters
    ----------
    source : niconv.manifest.Task or dict
        A task, or a log row (its ``subject`` column or ``details["subject"]``,
        and ``details["channels"]``, when the converter records them).
    channels : int, optional
        The sample's channel count, for the default names.

    Returns
    -------
    subject : str
        Recorded, else the input's name without image extensions.
    channels : list of str or None
        Recorded, else ``["image"]`` for one channel, ``["channel0", ...]`` for
        several; None when neither is known.
    """
    if isinstance(source, dict):
        details = _details(source)
        subject = source.get("subject") or details.get("subject")
        names = details.get("channels")
    else:  # a task: a subject task carries its record (name, channels as (name, path, volume))
        record = getattr(source, "subject", None)
        subject = getattr(record, "name", None)
        names = [name for name, _, _ in record.channels] if record is not None else None
    subject = subject or image_stem(source["input_path"] if isinstance(source, dict) else source.input_path)
    if not names and channels is not None:
        names = ["image"] if channels == 1 else [f"channel{i}" for i in range(channels)]
    return str(subject), (list(names) if names else None)


def _details(row: dict) -> dict:
    try:
        details = json.loads(row.get("details") or "{}")
    except ValueError:
        return {}
    return details if isinstance(details, dict) else {}


def _split_key(source, by: str, root: str) -> str:
    """What is split: the subject, or (``by: sample``) the output's path in the output root."""
    if by == "sample":
        out = source["output_path"] if isinstance(source, dict) else source.output_path
        return Path(os.path.relpath(out, root)).as_posix()
    return sample_names(source)[0]


# ---------------------------------------------------------------- splits


def unit_hash(seed: int, key: str) -> float:
    """``key`` mapped to ``[0, 1)`` by sha256 of the seed and the key: the same everywhere, always."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign_splits(keys: Iterable[str], *, val: float | None = None, test: float = 0.0, folds: int | None = None,
                  seed: int = 0, strata: dict[str, str] | None = None) -> dict[str, tuple[str, int | None]]:
    """Assign each key (subject) to a split, and a fold.

    Each key has a position in ``[0, 1)``: its :func:`unit_hash` (stable when
    keys are added), or with ``strata`` its rank by that hash within its stratum,
    ``(rank + 0.5) / n`` (fractions met within each stratum). Positions below
    ``test`` are ``test``; with ``folds``, the others are ``train`` with fold
    ``floor(K * (p - test) / (1 - test))``; else those below ``test + val`` are
    ``val`` and the rest ``train``.

    Parameters
    ----------
    keys : iterable of str
    val, test : float
        Fractions in ``[0, 1)``.
    folds : int, optional
        Number of folds K (``val`` is then not used).
    seed : int
    strata : dict, optional
        Key -> stratum; every key must have one.

    Returns
    -------
    dict
        Key -> ``(split, fold)``; ``fold`` is None without ``folds`` and for ``test``.
    """
    keys = sorted(set(keys))
    positions: dict[str, float] = {}
    if strata is None:
        positions = {k: unit_hash(seed, k) for k in keys}
    else:
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(strata[k], []).append(k)
        for members in groups.values():
            ranked = sorted(members, key=lambda k: (unit_hash(seed, k), k))
            positions.update({k: (i + 0.5) / len(ranked) for i, k in enumerate(ranked)})
    out = {}
    for k in keys:
        p = positions[k]
        if p < test:
            out[k] = ("test", None)
        elif folds:
            out[k] = ("train", min(folds - 1, int(folds * (p - test) / (1 - test))))
        elif val and p < test + val:
            out[k] = ("val", None)
        else:
            out[k] = ("train", None)
    return out


@dataclass(frozen=True)
class Splits:
    """The split of a run's samples (:func:`make_splits`).

    Attributes
    ----------
    options : SplitOptions or None
        None: no ``dataset.split``; every sample is ``train``.
    assigned : dict
        Key (subject, or sample path with ``by: sample``) -> ``(split, fold)``.
    root : str
        The output root (sample keys are relative to it).
    """

    options: Optional[SplitOptions]
    assigned: dict
    root: str

    def of(self, source) -> tuple[str, int | None]:
        """``(split, fold)`` of a task or log row."""
        if self.options is None:
            return "train", None
        return self.assigned.get(_split_key(source, self.options.by, self.root), ("train", None))

    def as_json(self) -> dict:
        """The contents of ``splits.json``: seed, by, the sorted keys of each split (and of each fold)."""
        o = self.options
        record = {"seed": o.seed, "by": o.by}
        for name in ("train", "val", "test"):
            record[name] = sorted(k for k, (s, _) in self.assigned.items() if s == name)
        if o.folds:
            record["folds"] = [sorted(k for k, (_, f) in self.assigned.items() if f == i) for i in range(o.folds)]
        return record

    def index_entry(self) -> dict | None:
        """The ``splits`` entry of ``dataset.json``."""
        o = self.options
        if o is None:
            return None
        return {"file": SPLITS_FILE, "by": o.by, "seed": o.seed, "val": o.val, "test": o.test, "folds": o.folds}

    def warnings(self) -> list[str]:
        """What a user must know before training on this split: each asked-for split, and the folds, left empty.

        A small cohort can leave a split empty (hash positions only approximate
        the fractions). The assignment is not changed for it (subjects keep their
        splits), so each line names the split, the number of subjects (samples,
        ``by: sample``) and the fraction asked for, and a remedy: of the next
        :data:`SEED_SEARCH` seeds (fewer in a large cohort), the one that leaves nothing empty and comes
        nearest the fractions, when one does.

        Returns
        -------
        list of str
            One line per empty split, one for all empty folds; empty when
            nothing is empty (or without ``dataset.split``).
        """
        o = self.options
        if o is None or not self.assigned:
            return []
        sizes = _split_sizes(self.assigned, o)
        empty = [k for k, count in sizes.items() if not count]
        if not empty:
            return []
        n, unit = len(self.assigned), "samples" if o.by == "sample" else "subjects"
        remedy = _remedy(sorted(self.assigned), o, unit)
        lines = []
        asked = {"train": ("what val and test leave,", 1 - (o.val or 0.0) - o.test), "val": ("val:", o.val),
                 "test": ("test:", o.test)}
        for name in (k for k in empty if isinstance(k, str)):
            what, fraction = asked[name]
            lines.append(f"dataset.split: the {name} split is empty: none of the {n} {unit} went to it "
                         f"({what} {fraction:g}, asks for about {fraction * n:.1f} of them); {remedy}")
        folds = [k for k in empty if isinstance(k, int)]
        if folds:
            rest = sum(count for k, count in sizes.items() if isinstance(k, int))
            which = (f"fold {folds[0]} of {o.folds} is" if len(folds) == 1 else
                     f"folds {', '.join(map(str, folds[:-1]))} and {folds[-1]} of {o.folds} are")
            lines.append(f"dataset.split: {which} empty: none of the {rest} non-test {unit} went to "
                         f"{'it' if len(folds) == 1 else 'them'} (folds: {o.folds} asks for about "
                         f"{rest / o.folds:.1f} in each); {remedy}")
        return lines


#: Seeds after the configured one tried for one that leaves no split empty (:meth:`Splits.warnings`), fewer
#: in a large cohort so that the search hashes at most SEED_SEARCH_KEYS keys (about 0.2 s).
SEED_SEARCH = 100
SEED_SEARCH_KEYS = 20_000


def _split_sizes(assigned: dict, o: SplitOptions) -> dict:
    """Keys in each asked-for split: ``train`` (without folds), ``val``, ``test`` by name, each fold by number."""
    sizes = {name: 0 for name, wanted in (("train", not o.folds), ("val", o.val), ("test", o.test)) if wanted}
    sizes.update({k: 0 for k in range(o.folds or 0)})
    for split, fold in assigned.values():
        key = split if fold is None else fold
        if key in sizes:
            sizes[key] += 1
    return sizes


def _remedy(keys: list[str], o: SplitOptions, unit: str) -> str:
    """How to fill every split: a seed that does (the one nearest the fractions), or why no seed can."""
    if o.stratify is not None:  # ranks within a stratum do not depend on the seed
        return ("with stratify the fractions are met within each stratum, and strata this small leave it empty "
                "whatever the seed: stratify by a coarser column, or ask for a larger fraction")
    n = len(keys)
    share = {"train": 1 - (o.val or 0.0) - o.test, "val": o.val, "test": o.test}
    needed = len(_split_sizes({}, o))
    if n < needed:
        what = ("folds" if not o.test else "splits and folds") if o.folds else "splits"
        return f"{n} {unit} cannot fill {needed} {what}: ask for fewer"
    best = None
    for seed in range(o.seed + 1, o.seed + 1 + min(SEED_SEARCH, max(1, SEED_SEARCH_KEYS // n))):
        sizes = _split_sizes(assign_splits(keys, val=o.val, test=o.test, folds=o.folds, seed=seed), o)
        if all(sizes.values()):
            expected = {k: n * (share[k] if isinstance(k, str) else (1 - o.test) / o.folds) for k in sizes}
            off = sum(abs(count - expected[k]) for k, count in sizes.items())
            if best is None or off < best[0]:
                best = (off, seed, sizes)
    why = f"{unit} go to splits by a hash of the seed and their name, which meets the fractions only roughly " \
          f"when they ask for few {unit}"
    if best is None:
        return f"{why}: try another dataset.split.seed, or ask for a larger fraction"
    _, seed, sizes = best
    folds = [str(count) for k, count in sizes.items() if isinstance(k, int)]
    shown = ([f"folds of {', '.join(folds)}"] if folds else []) + [
        f"{k} {count}" for k, count in sizes.items() if isinstance(k, str)]
    return f"{why}: dataset.split.seed: {seed} fills every split ({', '.join(shown)}; other {unit} move too)"


def make_splits(config, tasks: tuple[Task, ...]) -> Splits:
    """The splits of a manifest's samples by ``dataset.split``.

    Raises
    ------
    ConfigError
        If the stratification CSV cannot be read, lacks the ``subject`` column
        or the named one, or has no row for some subjects.
    """
    root = os.path.abspath(config.output.root)
    o = config.dataset.split
    if o is None:
        return Splits(None, {}, root)
    keys = sorted({_split_key(t, o.by, root) for t in tasks})
    strata = _read_strata(o.stratify, keys) if o.stratify is not None else None
    return Splits(o, assign_splits(keys, val=o.val, test=o.test, folds=o.folds, seed=o.seed, strata=strata), root)


def _read_strata(s: StratifyOptions, keys: list[str]) -> dict[str, str]:
    where = str(s.csv)
    try:
        with open(s.csv, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = list(rows[0]) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise ConfigError(where, f"dataset.split.stratify.csv: cannot read the CSV ({why})") from exc
    for needed, key in (("subject", "csv"), (s.column, "column")):
        if needed not in columns:
            raise ConfigError(where, f"dataset.split.stratify.{key}: expected a column '{needed}' in the CSV, "
                                     f"found the columns {', '.join(columns) or 'none'}"
                                     f"{did_you_mean(needed, columns)}")
    strata = {row["subject"]: row[s.column] for row in rows}
    missing = [k for k in keys if k not in strata]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(where, f"dataset.split.stratify.csv: expected a row for every subject, found none for "
                                 f"{len(missing)} subject(s): {shown}")
    return {k: strata[k] for k in keys}


# ---------------------------------------------------------------- cohort statistics


def cohort_step(options) -> tuple[int, object] | None:
    """``(index, options)`` of the first ``normalize`` step with ``scope: cohort``, or None."""
    for i, entry in enumerate(getattr(options, "steps", ()) or ()):
        if entry.step.name == "normalize" and entry.options.scope == "cohort":
            return i, entry.options
    return None


def needs_first_pass(config) -> bool:
    """True when the run must measure the cohort's statistics first (none given in the config)."""
    found = cohort_step(config.convert)
    return found is not None and found[1].statistics is None


def statistics_log_path(log_path, shard: tuple[int, int] | None = None) -> Path:
    """The first pass's log beside the run's: ``niconv_log.csv`` -> ``niconv_log.stats.csv`` (per shard)."""
    p = Path(log_path)
    return shard_log_path(p.with_name(f"{p.stem}.stats{p.suffix}"), shard)


@dataclass(frozen=True)
class CohortStatistics:
    """The training split's statistics: per channel name, and in channel order for the step.

    Attributes
    ----------
    method : str
    channels : dict
        Channel name -> ``{"mean", "std", "voxels"}`` (zscore) or ``{"low", "high", "voxels"}``
        (minmax, percentile).
    samples : int
        Training samples measured (0 for statistics given in the config).
    split : str or None
        ``"train"``; None for statistics given in the config.
    """

    method: str
    channels: dict
    samples: int
    split: Optional[str] = "train"

    @property
    def values(self) -> tuple[dict, ...]:
        """The normalize step's ``statistics`` option: per channel, in channel order, without counts."""
        return tuple({k: v for k, v in s.items() if k != "voxels"} for s in self.channels.values())

    def as_json(self) -> dict:
        """The ``statistics`` entry of ``dataset.json`` and of the run record."""
        return {"scope": "cohort", "method": self.method, "split": self.split, "channels": self.channels}


def training_tasks(tasks: tuple[Task, ...], splits: Splits) -> list[Task]:
    """The tasks whose samples are in the training split (label-map inputs, which skip normalize, left out)."""
    return [t for t in tasks if not t.label_map and splits.of(t)[0] == "train"]


def first_pass(config, tasks: tuple[Task, ...], splits: Splits, run_tasks: Callable[[list[Task]], Iterator[TaskResult]],
               shard: tuple[int, int] | None = None) -> CohortStatistics:
    """Measure the training tasks not measured yet, then combine every recorded measure.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task
        The whole manifest (every shard measures the whole training split).
    splits : Splits
    run_tasks : callable
        ``run_tasks(tasks)`` yields the :func:`statistics_batch` result of each
        task: the runner's dispatch.
    shard : (int, int), optional
        A shard appends to its own statistics log; all of them are read.

    Raises
    ------
    NiconvError
        If no training sample could be measured, or samples have different channels.
    OSError
        If the statistics log cannot be written.
    """
    train = training_tasks(tasks, splits)
    if not train:  # nothing to measure: say why, not that samples could not be read
        samples = Counter(splits.of(t)[0] for t in tasks if not t.label_map)
        shares = ", ".join(f"{n} {name}" for name, n in sorted(samples.items()))
        raise NiconvError("dataset.split", f"cohort statistics: the training split is empty ({sum(samples.values())} "
                                           f"samples: {shares}); scope: cohort normalizes with the training "
                                           "samples' statistics: lower val and test, or add subjects")
    # measured, or skipped (an input preprocess does not take): not again; a failed one is tried again
    done = {k for k, r in _latest_measures(config, train).items() if r["status"] != "failed"}
    pending = [t for t in train if t.task_id not in done]
    if pending:
        with CsvLog(statistics_log_path(config.log_path, shard)) as log:
            for result in run_tasks(pending):
                log.append(result)
    return combine(config, _measured(config, train).values())


def recorded_statistics(config, tasks: tuple[Task, ...]) -> CohortStatistics | None:
    """The statistics the first pass recorded for this manifest, if every training task was measured."""
    train = training_tasks(tasks, make_splits(config, tasks))
    latest = _latest_measures(config, train)
    if not latest or any(t.task_id not in latest for t in train):
        return None
    return combine(config, [r for r in latest.values() if r["status"] == "ok"])


def _latest_measures(config, train: list[Task]) -> dict[str, dict]:
    ids = {t.task_id for t in train}
    rows = (r for p in log_files(statistics_log_path(config.log_path)) for r in read_log(p).rows
            if r["task_id"] in ids)
    return latest_by_task(rows)


def _measured(config, train: list[Task]) -> dict[str, dict]:
    """Task id -> its latest ``ok`` measure row, across the statistics logs (a killed pass's too)."""
    return {k: r for k, r in _latest_measures(config, train).items() if r["status"] == "ok"}


def combine(config, rows: Iterable[dict]) -> CohortStatistics:
    """Combine per-task partials (rows of the statistics log) into the cohort's, in task-id order."""
    _, p = cohort_step(config.convert)
    rows = sorted(rows, key=lambda r: r["task_id"])
    if not rows:
        raise NiconvError("dataset", "cohort statistics: no training sample could be read (see the statistics "
                                     "log's failed rows); nothing to normalize with")
    measures = [(r, _details(r)) for r in rows]
    names = measures[0][1].get("channels")
    for r, d in measures:
        if d.get("channels") != names:
            raise NiconvError(r["input_path"], f"cohort statistics need the same channels in every training sample: "
                                               f"{', '.join(d.get('channels') or [])} here, "
                                               f"{', '.join(names or [])} in {measures[0][0]['input_path']}")
    channels = {}
    for c, name in enumerate(names):
        parts = [d["partials"][c] for _, d in measures if d["partials"][c]["voxels"]]
        channels[name] = (_combine_zscore(parts) if p.method == "zscore" else _combine_minmax(parts)
                          if p.method == "minmax" else _combine_percentiles(parts, p.percentiles or (0.5, 99.5)))
    return CohortStatistics(p.method, channels, len(rows))


def _combine_zscore(parts: list[dict]) -> dict:
    n, mean, m2 = 0, 0.0, 0.0
    for part in parts:  # Chan et al.: exact pairwise merge of counts, means and squared deviations
        k = part["voxels"]
        delta = part["mean"] - mean
        total = n + k
        mean += delta * k / total
        m2 += part["m2"] + delta * delta * n * k / total
        n = total
    if n == 0:
        return {"mean": 0.0, "std": 1.0, "voxels": 0}
    std = math.sqrt(m2 / n)
    return {"mean": mean, "std": std if std >= STD_EPS else 1.0, "voxels": n}


def _combine_percentiles(parts: list[dict], percentiles) -> dict:
    """Percentiles of the pooled voxels from each task's quantile grid: the pooled distribution
    function is the count-weighted mean of the tasks' (linear between grid points), solved for
    each percentile by bisection; within 100 / (QUANTILE_GRID - 1) percentile points of the exact one."""
    if not parts:
        return {"low": 0.0, "high": 1.0, "voxels": 0}
    probs = np.linspace(0.0, 1.0, QUANTILE_GRID)
    grids = [(p["voxels"], np.maximum.accumulate(np.asarray(p["quantiles"], dtype=np.float64))) for p in parts]
    total = sum(n for n, _ in grids)

    def cdf(v: float) -> float:
        return sum(n * float(np.interp(v, g, probs)) for n, g in grids) / total

    out = []
    for q in percentiles:
        lo, hi = min(g[0] for _, g in grids), max(g[-1] for _, g in grids)
        for _ in range(100):  # float64 bisection: a fixed number of halvings, the same result everywhere
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < q / 100 else (lo, mid)
        out.append(hi)
    return {"low": out[0], "high": out[1], "voxels": total}


def _combine_minmax(parts: list[dict]) -> dict:
    if not parts:
        return {"low": 0.0, "high": 1.0, "voxels": 0}
    return {"low": min(p["low"] for p in parts), "high": max(p["high"] for p in parts),
            "voxels": sum(p["voxels"] for p in parts)}


def statistics_batch(tasks: list[Task], scope=None) -> list[TaskResult]:
    """:func:`measure` over a batch of tasks: the first pass's worker function (``scope``: unused, it writes nothing)."""
    return [measure(t) for t in tasks]


def measure(task: Task) -> TaskResult:
    """One task's per-channel partials as the data reaches its cohort ``normalize`` step; never raises.

    Returns
    -------
    TaskResult
        ``ok`` with ``details`` ``{"channels", "step", "partials"}`` (per channel
        ``voxels`` and ``mean``, ``m2`` or ``low``, ``high``) and ``sha256`` of
        that text; ``skipped`` or ``failed`` as a conversion would be.
    """
    start = time.perf_counter()
    base = dict(task_id=task.task_id, converter=task.converter, input_path=task.input_path,
                output_path=task.output_path, bytes_in=task.bytes_in)
    try:
        index, p = cohort_step(task.options)
        data = preprocess.arrays_before(task, task.options, index).data
        partials = [_partial(x, p) for x in data]
        details = json.dumps({"channels": sample_names(task, data.shape[0])[1], "step": index,
                              "partials": partials}, sort_keys=True)
        return TaskResult(status="ok", output_shape=fmt_shape(data.shape), output_dtype=data.dtype.name,
                          sha256=hashlib.sha256(details.encode()).hexdigest(), details=details,
                          seconds=round(time.perf_counter() - start, 4), **base)
    except SkippedInput as exc:
        status, exc_type, message = "skipped", type(exc).__name__, str(exc)
    except NiconvError as exc:
        status, exc_type, message = "failed", type(exc).__name__, str(exc)
    except MemoryError as exc:
        status, exc_type, message = "failed", type(exc).__name__, f"{task.input_path}: not enough memory for this file"
    except Exception as exc:  # noqa: BLE001 - a library's error costs only this task
        status, exc_type, message = "failed", type(exc).__name__, f"{task.input_path}: {type(exc).__name__}: {exc}"
    return TaskResult(status=status, error_type=exc_type, error_message=" ".join(message.split())[:2000],
                      seconds=round(time.perf_counter() - start, 4), **base)


def _partial(x, p) -> dict:
    if p.method == "zscore":
        mean, std, count = iops.masked_moments(x, p.mask)
        return {"voxels": count, "mean": mean if count else 0.0, "m2": std * std * count if count else 0.0}
    if p.method == "percentile":
        grid, count = iops.masked_percentiles(x, np.linspace(0.0, 100.0, QUANTILE_GRID), p.mask)
        return {"voxels": count, "quantiles": grid if count else []}
    (low, high), count = iops.masked_minmax(x, p.mask)
    return {"voxels": count, "low": low if count else 0.0, "high": high if count else 0.0}


def with_statistics(config, tasks: tuple[Task, ...], statistics: CohortStatistics) -> tuple[Task, ...]:
    """The conversion tasks: the cohort statistics in the normalize step's options, and ids that hash them."""
    index, p = cohort_step(config.convert)
    entry = config.convert.steps[index]
    steps = list(config.convert.steps)
    steps[index] = entry.model_copy(update={entry.step.name: p.model_copy(update={"statistics": statistics.values})})
    options = config.convert.model_copy(update={"steps": tuple(steps)})
    dumped = options.model_dump(mode="json")
    return tuple(replace(t, options=options, task_id=task_id({"task": t.task_id}, t.converter, dumped))
                 for t in tasks)


def given_statistics(config, tasks: tuple[Task, ...]) -> CohortStatistics | None:
    """The cohort statistics the config gives (``normalize: {scope: cohort, statistics: [...]}``), by channel
    name (:func:`sample_names` of the first task); None when it gives none."""
    found = cohort_step(config.convert)
    if found is None or found[1].statistics is None:
        return None
    values = found[1].statistics
    names = (sample_names(tasks[0], len(values))[1] if tasks else None) or [f"channel{i}" for i in range(len(values))]
    return CohortStatistics(found[1].method, {n: dict(v) for n, v in zip(names, values)}, 0, split=None)


def conversion_tasks(config, tasks: tuple[Task, ...]) -> tuple[tuple[Task, ...], CohortStatistics | None]:
    """The manifest as the conversion pass runs it: with the recorded cohort statistics applied
    (unchanged when the run has none to compute); ``None`` statistics when not all are measured yet."""
    if not needs_first_pass(config):
        return tasks, given_statistics(config, tasks)
    statistics = recorded_statistics(config, tasks)
    return (tasks, None) if statistics is None else (with_statistics(config, tasks, statistics), statistics)


# ---------------------------------------------------------------- the index


def index_problem(path: Path) -> str | None:
    """Why an existing ``dataset.json`` is not niconv's to replace, else None."""
    return _json_problem(path, lambda d: d.get("format") == INDEX_FORMAT,
                         f"a niconv dataset index (a JSON object with \"format\": \"{INDEX_FORMAT}\")")


def splits_problem(path: Path) -> str | None:
    """Why an existing ``splits.json`` is not niconv's to replace, else None."""
    return _json_problem(path, lambda d: {"seed", "by", "train", "val", "test"} <= set(d),
                         "a niconv splits file (a JSON object with seed, by, train, val and test)")


def _json_problem(path: Path, ours: Callable[[dict], bool], what: str) -> str | None:
    if not os.path.lexists(path):
        return None
    found = own_file_problem(path)
    if found:
        return f"is {found}"
    try:  # an index of a hundred thousand samples is a few hundred MB; a larger file is not one
        data = json.loads(Path(path).read_bytes()) if os.path.getsize(path) <= INDEX_MAX_BYTES else None
    except (OSError, ValueError):
        data = None
    return None if isinstance(data, dict) and ours(data) else f"is not {what}"


def own_files(config) -> dict[Path, tuple[str, Callable[[Path], str | None]]]:
    """The dataset files a ``to: preprocess`` run writes in its output root: path -> (what it is, its
    problem check). The cohort statistics' logs (:func:`statistics_log_path`) are CSV logs, checked as logs."""
    if config.convert.to != "preprocess":
        return {}
    root = Path(config.output.root)
    files = {root / INDEX_FILE: ("the dataset index", index_problem)}
    if config.dataset.split is not None:
        files[root / SPLITS_FILE] = ("the splits file", splits_problem)
    return files


def _write_own(path: Path, record: dict, problem: Callable[[Path], str | None], what: str) -> None:
    found = problem(path)
    if found:
        raise OutputError(str(path), f"{what} exists and {found}; niconv writes only files it made: move that file")
    # a name byte that is not UTF-8 (a lone surrogate, os.fsdecode) becomes the JSON escape \udcXX: the
    # file stays UTF-8 that every JSON reader takes, and json.loads gives back the same path
    data = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)


def build_index(config, tasks: tuple[Task, ...], splits: Splits,
                statistics: CohortStatistics | None = None) -> dict:
    """The contents of ``dataset.json`` from the log's latest ``ok`` rows of ``tasks``."""
    root = Path(config.output.root)
    latest = latest_rows(config, tasks)
    samples = []
    for t in tasks:
        row = latest.get(t.task_id)
        if row is not None and row["status"] == "ok":
            samples.append(_sample(row, t, root, splits))
    samples.sort(key=lambda s: s["id"])
    names = {json.dumps(s["channels"]) for s in samples}
    labels = sorted({s["label_name"] for s in samples if s["label_name"]})
    for s in samples:
        del s["label_name"]
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "niconv": __version__,
        "layout": config.convert.layout,
        "channels": json.loads(names.pop()) if len(names) == 1 else None,
        "label": labels[0] if len(labels) == 1 else None,
        "preprocessing": preprocess.steps_as_dicts(config.convert),
        "splits": splits.index_entry(),
        "statistics": statistics.as_json() if statistics is not None else None,
        "samples": samples,
    }


def _sample(row: dict, task: Task, root: Path, splits: Splits) -> dict:
    details = _details(row)
    options = task.options
    shape = [int(n) for n in row["output_shape"].split("x")] if row["output_shape"] else []
    last = options.layout == "channels_last"
    channels = shape[-1] if last else shape[0] if shape else None
    subject, names = sample_names(row, channels)
    if options.format == "nifti":  # the file holds (X, Y, Z[, C]) whatever the layout
        spatial = shape[:-1] if last else shape[1:]
        shape = spatial + ([channels] if channels and channels > 1 else [])
    label = details.get("label") if isinstance(details.get("label"), dict) else None
    paths = [_relative(p, root) for p in preprocess.output_paths(task)]
    label_file = None
    if label is not None:
        label_file = paths[0] if options.format == "npz" else paths[-1]
    label_shape = label.get("shape") if label else None
    if label_shape is not None and options.format == "nifti":
        label_shape = label_shape[:-1] if last else label_shape[1:]
    split, fold = splits.of(row)
    after = details.get("after", {})
    return {
        "id": row["task_id"], "subject": subject, "split": split, "fold": fold,
        "image": paths[0], "label": label_file, "format": options.format,
        "shape": shape, "dtype": row["output_dtype"],
        "label_shape": label_shape, "label_dtype": label.get("dtype") if label else None,
        "label_values": label.get("values_after") if label else None,
        "channels": names, "spacing": after.get("spacing"), "affine": after.get("affine"),
        "label_name": (label.get("channel") or "label") if label else None,
    }


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def write_dataset_files(config, tasks: tuple[Task, ...], splits: Splits | None = None,
                        statistics: CohortStatistics | None = None) -> Path:
    """Write ``dataset.json`` (and ``splits.json`` with ``dataset.split``) atomically in the output root.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task
        The conversion tasks (:func:`conversion_tasks`: with the cohort statistics applied).
    splits : Splits, optional
        Default: :func:`make_splits` of ``tasks``.
    statistics : CohortStatistics, optional

    Returns
    -------
    Path
        The index written.

    Raises
    ------
    OutputError
        If a file of that name exists and is not niconv's, or writing fails.
    """
    splits = splits if splits is not None else make_splits(config, tasks)
    root = Path(config.output.root)
    if splits.options is not None:
        _write_own(root / SPLITS_FILE, splits.as_json(), splits_problem, "the splits file")
    index = build_index(config, tasks, splits, statistics)
    _write_own(root / INDEX_FILE, index, index_problem, "the dataset index")
    return root / INDEX_FILE
