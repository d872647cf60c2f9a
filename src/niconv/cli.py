"""The ``niconv`` command line; the one map from exceptions to exit codes.

Exit codes: 0 every task ok (or already done); 1 at least one task failed;
2 config or usage error; 130 interrupted.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import os
import sys
from importlib import resources
from pathlib import Path

from . import __version__, converters
from .errors import ClusterError, ConfigError, LockError, LogError, NiconvError, ScanError
from .manifest import MAX_SHARDS, TASKS_PER_SHARD, default_shards
from .subjects import LAYOUTS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, found {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, found {text!r}")
    if n > MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SHARDS} shards (N), found {text!r}")
    return i, n


def _shard_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of shards, found {text!r}") from None
    if not 1 <= n <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_SHARDS} shards, found {text!r}")
    return n


def add_command(subparsers, name: str, text: str, config: bool = False) -> argparse.ArgumentParser:
    """Add a subcommand described by ``text`` (its line in ``niconv --help`` and the first line of
    its own ``--help``), with the CONFIG argument when ``config``."""
    parser = subparsers.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    if config:
        parser.add_argument("config", help="the YAML config file (`niconv init` prints an example)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="niconv", description="Parallel, resumable batch conversion of medical-imaging cohorts.")
    p.add_argument("--version", action="version", version=f"niconv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = add_command(sub, "run", "convert every input of a config that is not done yet", config=True)
    r.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: config 'jobs', else every CPU "
                   "this process may use; never more than those)")
    r.add_argument("--force", action="store_true", help="redo every task, even those already done")
    r.add_argument("--retry-failed", action="store_true", help="redo tasks that failed in an earlier run")
    r.add_argument("--verify", action="store_true",
                   help="re-hash the outputs of the done tasks first and redo those whose output is missing or differs")
    r.add_argument("--shard", type=_shard, metavar="I/N", help="run only shard I of N (balanced by input bytes)")
    r.add_argument("--backend", choices=["loky", "dask"], help="joblib backend (default: config 'backend', else loky)")
    r.add_argument("--scheduler", metavar="ADDR", help="Dask scheduler address, e.g. tcp://127.0.0.1:8786")
    r.add_argument("--quiet", action="store_true",
                   help="no progress (bar on a terminal, a line now and then otherwise); the summary still prints")

    pl = add_command(sub, "plan", "print the manifest, one line per task with its state; converts nothing",
                     config=True)
    pl.add_argument("--csv", action="store_true", help="write the tasks as CSV")
    pl.add_argument("--shard", type=_shard, metavar="I/N", help="only the tasks of shard I of N, with its log")

    add_command(sub, "validate", "check a config and its inputs as `plan` does; converts nothing", config=True)

    i = add_command(sub, "init", "print a commented example config")
    i.add_argument("--to", choices=converters.names(), default="numpy",
                   help="the converter of the example (default: numpy)")
    i.add_argument("--layout", choices=LAYOUTS,
                   help="with --to preprocess: a training set of multi-channel subjects in this layout")

    inf = add_command(sub, "info", "describe images and NumPy files: shape, dtype, zooms, orientation, scaling")
    inf.add_argument("files", nargs="+", metavar="FILE", help="images (any format nibabel reads), .npy or .npz")
    inf.add_argument("--header", action="store_true", help="also print the full header")

    ve = add_command(sub, "verify", "re-hash the outputs a log records and name the missing or different ones")
    ve.add_argument("log", help="a niconv CSV log (niconv_log.csv)")

    s = add_command(sub, "submit", "run the shards of a config as SLURM job arrays", config=True)
    s.add_argument("--slurm", action="store_true", help="submit to SLURM with sbatch (the only scheduler so far)")
    s.add_argument("--shards", type=_shard_count, metavar="N",
                   help=f"array tasks (default: cluster.slurm.shards, else one per {TASKS_PER_SHARD} inputs)")
    s.add_argument("--partition", metavar="P", help="sbatch --partition")
    s.add_argument("--time", metavar="T", help="sbatch --time per shard, e.g. 02:00:00")
    s.add_argument("--mem", metavar="M", help="sbatch --mem per shard, e.g. 8G")
    s.add_argument("--cpus", type=int, metavar="C", help="sbatch --cpus-per-task; the --jobs of each shard")
    s.add_argument("--max-parallel", type=int, metavar="K", help="at most K shards running at once (--array=...%%K)")
    s.add_argument("--retry-failed", action="store_true",
                   help="resubmit only the shards that still have failed or missing tasks")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    s.add_argument("--wait", action="store_true", help="wait until the arrays finish, then print the status")

    add_command(sub, "status", "count the done, failed, pending and skipped tasks across all shard logs", config=True)

    rp = add_command(sub, "report", "write report.html beside the log: every task, thumbnails, QC flags")
    rp.add_argument("source", metavar="CONFIG|LOG", help="the run's YAML config, or a niconv CSV log")
    rp.add_argument("--fail-on", metavar="FLAG,...", help="exit 1 if any of these flags is raised (one line per "
                    "flagged file), e.g. orientation,geometry,nonfinite")
    rp.add_argument("--json", metavar="PATH", help="also write the findings as JSON")
    rp.add_argument("--jobs", type=int, metavar="N", help="worker processes measuring volumes (default: every CPU "
                    "this process may use)")
    rp.add_argument("--no-thumbnails", action="store_true",
                    help="no thumbnails: read only the volumes whose figures are not in the log yet")

    m = add_command(sub, "merge", "merge the shard logs into one log, in manifest order", config=True)
    m.add_argument("--output", metavar="PATH", help="write here instead of the configured log")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    _paths_never_fail_to_print()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error or --help
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone (`| head`) shows here, not as Python exits
        return code
    except BrokenPipeError:
        # the reader stopped reading: end quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (ConfigError, ScanError, LockError, ClusterError) as exc:
        print(f"niconv: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NiconvError as exc:
        print(f"niconv: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("niconv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _paths_never_fail_to_print() -> None:
    """A file name that is not valid UTF-8 holds lone surrogates (os.fsdecode): stdout writes
    them back as the name's own bytes, so listings stay exact; stderr shows them escaped."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if not hasattr(stream, "reconfigure"):
            continue  # replaced by a caller (StringIO): takes any str
        utf8 = codecs.lookup(stream.encoding or "ascii").name == "utf-8"
        stream.reconfigure(errors=errors if utf8 else "backslashreplace")


def _damaged(count: int) -> str:
    return f"{count} damaged log line(s) skipped"


def _load(args, warn: bool = False):
    """The config and its manifest: every check `plan` and `run` make before any work (``warn``: see
    :func:`_manifest`)."""
    config = _config(args)
    return config, _manifest(config, warn=warn)


def _config(args):
    from .config import load_config

    return load_config(args.config, overrides={"jobs": getattr(args, "jobs", None)})


def _manifest(config, workers=None, warn: bool = False):
    """The manifest of a loaded config (``workers`` may read DICOM headers); with ``warn``, what a
    user should know before any work (an empty split) on stderr."""
    from .scan import build_manifest

    tasks = build_manifest(config, workers)
    if config.convert.to == "preprocess":
        from .dataset import make_splits

        splits = make_splits(config, tasks)  # a stratification CSV's problems, before any work
        for line in splits.warnings() if warn else ():
            print(f"niconv: warning: {line}", file=sys.stderr)
    return tasks


def _load_converted(args, warn: bool = False):
    """:func:`_load`, its tasks with the recorded cohort statistics applied: the ids the conversions ran under,
    which the logs hold (what `plan`, `status` and `report` compare with them)."""
    from .dataset import conversion_tasks

    config, tasks = _load(args, warn)
    return config, conversion_tasks(config, tasks)[0]


def cmd_run(args) -> int:
    from .dispatch import head_start
    from .runfiles import shard_log_path

    config = _config(args)
    # a first run's workers start now, so that their start-up overlaps the scan (which may use them);
    # a rerun may have nothing to do: its workers start once its plan shows work to share
    first = not os.path.lexists(shard_log_path(config.log_path, args.shard))
    workers = head_start(config, args.jobs, args.backend) if first else None
    try:
        from .runner import run

        s = run(config, _manifest(config, workers, warn=True), jobs=args.jobs, force=args.force,
                retry_failed=args.retry_failed, shard=args.shard, backend=args.backend, scheduler=args.scheduler,
                progress=not args.quiet, verify=args.verify, workers=workers)
    finally:
        if workers is not None:
            workers.ready()  # a process that exits while its pool is starting leaves tracebacks behind
    parts = [f"{s.converted} converted", f"{s.already_done} already done", f"{s.skipped} skipped",
             f"{s.failed} failed"]
    if s.redone:
        parts.append(f"{s.redone} redone (output missing or changed)")
    if s.failed_before:
        parts.append(f"{s.failed_before} failed earlier (--retry-failed to redo)")
    if s.log_damaged_lines:
        parts.append(_damaged(s.log_damaged_lines))
    rate = f" ({s.files_per_second:.1f} files/s converting)" if s.converted and s.conversion_seconds else ""
    print(f"niconv: {', '.join(parts)} in {s.seconds:.1f} s{rate}; log: {s.log_path}")
    if s.unlogged:
        print(f"niconv: {s.unlogged} result(s) could not be written to the log ({s.unlogged_reason}); "
              "the next run redoes those tasks", file=sys.stderr)
    if s.error:
        print(f"niconv: error: the run stopped early while {s.error}; fix that, then rerun the same "
              "command to resume (with --retry-failed to redo the tasks that failed)", file=sys.stderr)
    if s.interrupted:
        print("niconv: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if (s.failed or s.failed_before or s.error or s.unlogged) else EXIT_OK


def cmd_plan(args) -> int:
    import csv

    from .log import latest_by_task, read_log
    from .runfiles import shard_log_path
    from .runner import plan
    from .volume import skip_reason

    config, tasks = _load_converted(args, warn=True)
    logged = read_log(shard_log_path(config.log_path, args.shard))
    p = plan(tasks, logged.rows, shard=args.shard)
    latest = latest_by_task(logged.rows)
    # why each skipped task is skipped: logged, or (never run) the reason the run will give
    why = {t.task_id: latest[t.task_id]["error_message"].removeprefix(f"{t.input_path}: ")
           .removeprefix(f"{t.series.label}: " if t.series is not None else "") for t in p.skipped}
    reads_images = {name: converters.get(name).inputs == "image" for name in {t.converter for t in p.pending}}
    why.update({t.task_id: reason for t in p.pending
                if (reason := t.series.skip if t.series is not None else
                    reads_images[t.converter] and skip_reason(t.input_path))})
    state = {t.task_id: "pending" for t in p.pending}
    state.update({t.task_id: "done" for t in p.done})
    state.update({t.task_id: "failed" for t in p.failed_before})
    state.update({task_id: "skipped" for task_id in why})
    shown = [t for t in tasks if t.task_id in state]
    if args.csv:
        w = csv.writer(sys.stdout)
        # subject last, so the columns before it keep their places
        w.writerow(["task_id", "state", "converter", "input_path", "output_path", "bytes_in", "subject"])
        for t in shown:
            out = "" if t.task_id in why else t.output_path  # a skipped input writes nothing
            subject = t.subject.name if t.subject is not None else ""
            w.writerow([t.task_id, state[t.task_id], t.converter, t.input_path, out, t.bytes_in, subject])
    else:
        for t in shown:
            target = f"({why[t.task_id]})" if t.task_id in why else f"-> {t.output_path}"
            if t.subject is not None:  # a subject: its files, one line each
                print(f"{t.task_id}  {state[t.task_id]:<7}  subject {t.subject.name} {target}")
                _print_subject(t.subject)
                continue
            series = f" [{t.series.label}]" if t.series is not None else ""  # a DICOM series: what it holds
            print(f"{t.task_id}  {state[t.task_id]:<7}  {t.input_path}{series} {target}")
        if config.input.subject is not None:
            from .scan import ignored_files

            for path, reason in ignored_files(config):
                print(f"ignored  {path} ({reason})")
        count = collections.Counter(state.values())
        print(f"niconv: {len(shown)} task(s): {count['pending']} pending, {count['done']} done, "
              f"{count['failed']} failed earlier, {count['skipped']} skipped", file=sys.stderr)
    if logged.damaged_lines:
        print(f"niconv: {_damaged(logged.damaged_lines)}", file=sys.stderr)
    return EXIT_OK


def _print_subject(subject) -> None:
    """The channel files of a subject under its plan line; a missing channel says so."""
    for name, path, index in subject.channels:
        where = (path + (f" [volume {index}]" if index is not None else "")) if path else "MISSING (the task will fail)"
        print(f"    {name}: {where}")
    if subject.label_name is not None:
        print(f"    {subject.label_name} (label map): {subject.label or 'none found'}")


def cmd_validate(args) -> int:
    config, tasks = _load(args)
    what = "subject(s)" if config.input.subject is not None else "input(s)"
    print(f"niconv: {args.config} is valid ({len(tasks)} {what}, to: {config.convert.to}, "
          f"output: {config.output.root})")
    return EXIT_OK


def cmd_init(args) -> int:
    name = args.to
    if args.layout is not None:
        if args.to != "preprocess":
            raise ConfigError("--layout", f"subjects are converted by --to preprocess, found --to {args.to}")
        name = f"preprocess_{args.layout}"
    text = resources.files("niconv.templates").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    sys.stdout.write(text)
    return EXIT_OK


def cmd_info(args) -> int:
    from .info import describe
    from .text import first_line

    status = EXIT_OK
    for f in args.files:
        try:
            print(describe(f, header=args.header), flush=True)
        except NiconvError as exc:
            print(f"{f}: error: {exc.message}", file=sys.stderr, flush=True)
            status = EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 - one file nibabel trips over costs only that file
            why = first_line(exc, empty="no reason given")
            print(f"{f}: error: cannot describe this file ({why})", file=sys.stderr, flush=True)
            status = EXIT_FAILED
    return status


def cmd_verify(args) -> int:
    from .log import read_log
    from .runner import output_problem

    path = Path(args.log)
    if not path.exists():
        raise ConfigError(str(path), "log file not found")
    logged = read_log(path)
    if not logged.rows:
        found = _damaged(logged.damaged_lines) if logged.damaged_lines else "an empty log or only a header"
        raise LogError(str(path), f"expected log rows to verify against, found none ({found})")
    # the latest row of each output: an output redone (its input changed) has a newer row than the old task's
    latest = {r["output_path"]: r for r in logged.rows}
    rows = [r for r in latest.values() if r["status"] == "ok"]
    bad = 0
    for r in rows:
        problem = output_problem(r)
        if problem:
            print(f"{problem:<7}  {r['output_path']}")
            bad += 1
    notes = [f"{bad} missing or different (`niconv run CONFIG --verify` redoes them)"] if bad else []
    if logged.damaged_lines:
        notes.append(_damaged(logged.damaged_lines))
    print(f"niconv: {len(rows) - bad} of {len(rows)} outputs match the log" + "".join(f"; {n}" for n in notes))
    return EXIT_FAILED if bad else EXIT_OK


def cmd_submit(args) -> int:
    """``niconv submit CONFIG --slurm ...``: submit (or print) the sbatch arrays."""
    from pydantic import ValidationError

    from .config import SlurmOptions, load_config
    from .dataset import conversion_tasks
    from .runfiles import shards_to_retry
    from .scan import build_manifest
    from .schema import problems
    from .slurm import live_shards, shard_count, submit, wait

    if not args.slurm:
        print("niconv submit: say where to submit: --slurm", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config)
    overrides = {k: getattr(args, k) for k in ("partition", "time", "mem", "cpus", "max_parallel")
                 if getattr(args, k) is not None}
    data = {**config.cluster.slurm.model_dump(), **overrides}
    try:
        options = SlurmOptions.model_validate(data)
    except ValidationError as exc:
        # only the command line's values can be wrong here: the config's were checked on loading
        flags = [("--" + key.split(".")[0].replace("_", "-"), msg) for key, msg in problems(exc, SlurmOptions, data)]
        raise ConfigError("command line", "; ".join(f"{k}: {m}" for k, m in flags), flags) from exc
    tasks = build_manifest(config)
    shards = args.shards or options.shards
    only = None
    if args.retry_failed:
        shards = shards or shard_count(config, len(tasks))
        # with cohort statistics: the ids the shards converted under (shards go by size, not by id)
        retry = shards_to_retry(config, shards, conversion_tasks(config, tasks)[0])
        live = live_shards(config, shards) if not args.dry_run else set()
        # a shard still queued or running would write its log twice at once
        only = [s for s in retry if s not in live]
        if live & set(retry):
            print(f"still queued or running, not resubmitted: shards {_ranges(sorted(live & set(retry)))}")
        if not only:
            print("nothing to resubmit" + ("" if retry else f": every task of the {shards} shards is done"))
            return EXIT_OK
    shards = shards or default_shards(len(tasks))
    result = submit(args.config, config, shards, options, only=only, dry_run=args.dry_run,
                    retry_failed=args.retry_failed)
    if args.dry_run:
        print("\n".join(result), end="")
        return EXIT_OK
    count = shards if only is None else len(only)
    print(f"submitted {count} of {shards} shards ({len(tasks)} tasks) as job array(s): {' '.join(result)}")
    if not args.wait:
        print(f"follow with: niconv status {args.config}")
        return EXIT_OK
    wait(result)
    return cmd_status(args)


def _ranges(numbers: list[int]) -> str:
    """Shard numbers as compressed runs (``1,4-6``), as in ``--array``."""
    from .slurm import ArrayJob

    return ArrayJob(0, tuple(numbers)).array_range


def cmd_status(args) -> int:
    """``niconv status CONFIG``: task counts across all logs; EXIT_OK once every task is done or skipped."""
    from .runfiles import status
    from .slurm import live_shards, submissions

    config, tasks = _load_converted(args)
    st = status(config, tasks)
    print(f"{st.total} tasks: {st.done} done, {st.failed} failed, {st.pending} pending, {st.skipped} skipped "
          f"({len(st.logs)} log file(s) beside {config.log_path})")
    if st.damaged_lines:
        print(f"{st.damaged_lines} damaged log line(s) skipped")
    subs = submissions(config)
    if subs:
        with contextlib.suppress(ClusterError):  # squeue unavailable here: the counts still stand
            live = live_shards(config, int(subs[-1]["shards"]))
            print(f"queued or running: {len(live)} of {subs[-1]['shards']} shards")
    for path, kind, message in st.failures[:20]:
        print(f"failed: {path}: {kind}: {message}")
    if st.failed > 20:
        print(f"... and {st.failed - 20} more failed (niconv merge, then read the log)")
    return EXIT_OK if st.finished else EXIT_FAILED


def cmd_merge(args) -> int:
    """``niconv merge CONFIG``: write the merged log; EXIT_OK once every task is done or skipped."""
    from .config import load_config
    from .dataset import conversion_tasks, write_dataset_files
    from .lock import LOCK_FILE, run_lock
    from .runfiles import merge, status
    from .scan import build_manifest

    config = load_config(args.config)
    # --output takes the log's place in the plan's checks: never an input, absent, empty or a niconv log
    checked = load_config(args.config, overrides={"log": os.path.abspath(args.output)}) if args.output else config
    tasks = build_manifest(checked)
    # with cohort statistics: the ids the conversions ran under
    tasks, statistics = conversion_tasks(config, tasks)
    # the tree's lock: a run still appending rows would lose them under a replaced log
    with run_lock(Path(config.output.root) / LOCK_FILE):
        st = status(config, tasks)
        path = merge(config, tasks, args.output)
        index = write_dataset_files(config, tasks, statistics=statistics) if config.convert.to == "preprocess" else None
    finished = st.done + st.skipped
    print(f"merged {finished + st.failed} of {st.total} tasks from {len(st.logs)} log file(s) into {path}"
          + (f"; {st.failed} failed, {st.pending} pending" if not st.finished else "")
          + (f"; {st.damaged_lines} damaged log line(s) left out" if st.damaged_lines else "")
          + (f"; dataset index {index}" if index else ""))
    return EXIT_OK if st.finished else EXIT_FAILED


def cmd_report(args) -> int:
    """``niconv report CONFIG|LOG``: the page, the findings; EXIT_FAILED when a --fail-on flag is raised."""
    from .limits import cap_jobs, usable_cpus
    from .report import build_report, check_fail_on, fail_lines, gather_from_config, gather_from_log, is_log, \
        write_findings

    fail_on = check_fail_on(args.fail_on) if args.fail_on else []
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", f"expected a whole number of at least 1, found {args.jobs}")
    source = Path(args.source)
    if not source.exists():
        raise ConfigError(str(source), "file not found: expected a config or a niconv log")
    if is_log(source) or source.suffix.lower() == ".csv":
        entries, log_path, options, damaged = gather_from_log(source)
    else:
        config, tasks = _load_converted(argparse.Namespace(config=args.source))
        entries, log_path, options, damaged = gather_from_config(config, tasks)
    if not entries:
        raise LogError(str(log_path), "expected tasks to report on, found none (an empty log?)")
    report = build_report(entries, log_path, options, damaged, jobs=cap_jobs(args.jobs or usable_cpus()),
                          thumbs=not args.no_thumbnails)
    if args.json:
        write_findings(report, args.json)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items()))
    flagged = sum(1 for e in report.entries if e.flags)
    print(f"niconv: report of {len(report.entries)} task(s) ({counts}): {len(report.findings())} flag(s) on "
          f"{flagged} file(s); {report.measured} volume(s) read, {report.cached} from the cache, in "
          f"{report.seconds:.1f} s" + (f"; {_damaged(damaged)}" if damaged else "") + f"; {report.html_path}")
    lines = fail_lines(report, fail_on)
    for line in lines:
        print(line)
    return EXIT_FAILED if lines else EXIT_OK


_COMMANDS = {"run": cmd_run, "report": cmd_report, "plan": cmd_plan, "validate": cmd_validate, "init": cmd_init,
             "info": cmd_info, "verify": cmd_verify, "submit": cmd_submit, "status": cmd_status,
             "merge": cmd_merge}


if __name__ == "__main__":
    sys.exit(main())
