"""The YAML config (version 1): schema, validation, defaults.

The YAML is read with ``yaml.safe_load`` and validated once, here, into frozen
pydantic models. Every problem is reported in one pass, each naming the config
file, the key path (``convert.window``), what was expected and what was found;
unknown keys get a "did you mean" hint (:func:`niconv.schema.validated`).
Relative paths resolve against the config file's folder.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationInfo, field_validator

from . import converters
from .dataset import DatasetOptions
from .errors import ConfigError
from .limits import usable_cpus
from .manifest import MAX_SHARDS, TASKS_PER_SHARD
from .paths import resolve_path
from .qc import QcOptions, qc_options
from .schema import ConfigModel, config_error, found, show, validated
from .subjects import LAYOUTS, check_subject
from .text import first_line


#: A config is a few kB; a larger file is not one (and parsing megabytes of YAML takes minutes).
MAX_CONFIG_BYTES = 1 << 20
#: Values a config may hold once its YAML aliases are expanded. A config has a few dozen; an
#: alias of a list of aliases of ... (a "billion laughs" document) stands for billions.
MAX_CONFIG_VALUES = 100_000


def _required_path(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        raise ValueError("expected a folder path, found nothing (null)")
    return resolve_path(value, info)


class InputSpec(ConfigModel):
    """``input:``: where the cohort is and which files to take."""

    root: list[Path] = Field(description="input folder(s)")
    include: Optional[list[str]] = Field(None, description="globs relative to a root; default: every file the converter reads")
    exclude: list[str] = Field(default_factory=list)
    label_maps: list[str] = Field(
        default_factory=list, description="globs of inputs that are label maps (values kept, nearest neighbour, no window)")
    identity: Literal["mtime", "content"] = Field(
        "mtime", description="what tells a changed input: size + mtime, or a sha256 of the content")
    subject: Optional[str] = Field(
        None, description="one task per subject (to: preprocess): a pattern such as "
                          "'{subject}/{subject}_{channel}.nii.gz', a regular expression with named groups "
                          f"subject and channel, or a layout: {', '.join(LAYOUTS)}")

    _subject = field_validator("subject")(lambda v: check_subject(v))

    @field_validator("root", mode="before")
    @classmethod
    def _roots(cls, v, info: ValidationInfo):
        items = v if isinstance(v, list) else [v]
        if not items:
            raise ValueError("expected a folder or a list of folders, found an empty list")
        return [_required_path(x, info) for x in items]

    @field_validator("include", "exclude", "label_maps", mode="before")
    @classmethod
    def _globs(cls, v):
        # one glob may stand alone
        if isinstance(v, str):
            return [v]
        if v is None or isinstance(v, list):
            return v
        raise ValueError(f"expected a glob such as '**/*.nii.gz' or a list of globs, found {found(v)}")


class OutputSpec(ConfigModel):
    """``output:``: where converted files go."""

    root: Path
    layout: Literal["mirror", "flat"] = "mirror"
    name: Optional[str] = Field(
        None, description="output name of each DICOM series, a template of DICOM keywords such as "
                          "'sub-{PatientID}/{SeriesNumber:03d}_{SeriesDescription}' (also {series_id}, {folder}); "
                          "default '{folder}/{SeriesNumber:03d}_{SeriesDescription}_{series_id}' "
                          "(without {folder}/ for layout: flat)")

    _root = field_validator("root", mode="before")(_required_path)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        from .dicom import check_template

        return None if v is None else check_template(v)


class DicomOptions(ConfigModel):
    """``dicom:``: what DICOM series put into the log."""

    metadata: Literal["basic", "identifying"] = Field(
        "basic", description="basic: series-level fields only (modality, description, echo times, ...); "
                             "identifying: also patient name, IDs, birth date, study date and institution")


def _size(v: Any) -> Any:
    """Parse ``"8GiB"``, ``"500MB"``, a number of bytes, or a fraction of RAM like ``0.5``: finite, above 0."""
    if v is None:
        return v
    expected = "expected a size like '8GiB' or '500MB', or a fraction of the available memory like 0.5"
    number = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        number = v
    elif isinstance(v, str):
        low = v.strip().replace(" ", "").lower().rstrip("b").rstrip("i")
        units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
        if low and low[-1] in units:
            try:
                number = float(low[:-1]) * units[low[-1]]
            except ValueError:
                pass
    if number is None:
        raise ValueError(f"{expected}; found {show(v)}")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{expected}, above 0; found {show(v)}")
    return number


def _convert_union():
    models = []
    for name in converters.names():
        try:
            models.append(converters.get(name).options)
        except ModuleNotFoundError as exc:  # a converter whose module is not installed
            if exc.name and exc.name.startswith("niconv."):
                continue
            raise
    return Annotated[Union[tuple(models)], Field(discriminator="to")]


class SlurmOptions(ConfigModel):
    """``cluster.slurm``: how ``niconv submit`` writes its sbatch array scripts.

    Every field can be overridden on the command line (``--partition`` ...).
    """

    shards: Optional[int] = Field(None, ge=1, le=MAX_SHARDS, description=f"array tasks; default one per {TASKS_PER_SHARD} inputs")
    partition: Optional[str] = Field(None, description="sbatch --partition")
    time: Optional[str] = Field(None, description="sbatch --time per array task, e.g. '02:00:00' or '1-00:00:00'")
    mem: Optional[str] = Field(None, description="sbatch --mem per array task, e.g. '8G'")
    cpus: int = Field(1, ge=1, description="sbatch --cpus-per-task; also the --jobs of each shard")
    max_parallel: Optional[int] = Field(None, ge=1, description="array tasks running at once (the %K of --array)")
    job_name: str = Field("niconv", pattern=r"^[A-Za-z0-9_.+-]+$", description="sbatch --job-name")
    logs: Optional[Path] = Field(None, description="folder of the scripts and per-task stdout/stderr; "
                                                   "default <log folder>/<log stem>.slurm")
    sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH lines, e.g. '--account=lab'")
    preamble: str = Field("", description="shell lines run before niconv (module load, venv activate)")
    command: str = Field("niconv", description="how the job calls niconv, e.g. '/opt/venv/bin/niconv'")

    _logs = field_validator("logs", mode="before")(resolve_path)

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        # SLURM accepts M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
        if v is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", v):
            raise ValueError(f"expected a SLURM time like '02:00:00' or '1-12:00:00', found {v!r}")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v):
        if v is not None and not re.fullmatch(r"\d+[KMGT]?", str(v), re.IGNORECASE):
            raise ValueError(f"expected a SLURM memory size like '8G' or '500M', found {v!r}")
        return None if v is None else str(v)

    @field_validator("sbatch", mode="before")
    @classmethod
    def _sbatch(cls, v):
        items = [v] if isinstance(v, str) else v
        out = []
        for item in items or []:
            line = str(item).strip()
            # accept '#SBATCH --x', 'SBATCH --x' and '--x' alike
            line = re.sub(r"^#?\s*SBATCH\s+", "", line)
            if "\n" in line or not line.startswith("-"):
                raise ValueError(f"expected one sbatch option per item like '--account=lab', found {item!r}")
            out.append(line)
        return out

    @field_validator("preamble", mode="before")
    @classmethod
    def _preamble(cls, v):
        return "\n".join(map(str, v)) if isinstance(v, list) else (v or "")


class JobqueueOptions(ConfigModel):
    """``cluster.jobqueue``: Dask workers as SLURM jobs (``dask_jobqueue.SLURMCluster``).

    Used by ``backend: dask`` when no scheduler address is given; without this
    section a ``distributed.LocalCluster`` is started instead. The fields are
    ``SLURMCluster`` arguments of the same name, plus ``jobs`` and ``timeout``.
    """

    jobs: int = Field(1, ge=1, description="SLURM jobs to start (each runs `processes` workers)")
    cores: int = Field(1, ge=1)
    memory: str = "2GB"
    processes: int = Field(1, ge=1)
    queue: Optional[str] = Field(None, description="partition")
    account: Optional[str] = None
    walltime: str = "01:00:00"
    interface: Optional[str] = Field(None, description="network interface of scheduler and workers, e.g. 'ib0'")
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    log_directory: Optional[Path] = None
    timeout: float = Field(300, gt=0, description="seconds to wait for the workers to start")

    _log_directory = field_validator("log_directory", mode="before")(resolve_path)


class ClusterOptions(ConfigModel):
    """The ``cluster:`` section of a config."""

    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    jobqueue: Optional[JobqueueOptions] = None


class Config(ConfigModel):
    """A validated run configuration (the fully resolved form is written to the run record)."""

    version: Literal[1] = 1
    input: InputSpec
    output: OutputSpec
    convert: _convert_union()  # type: ignore[valid-type]
    log: Optional[Path] = Field(None, description="CSV log; default <output.root>/niconv_log.csv")
    jobs: Optional[int] = Field(None, ge=1, description="worker processes; default, and at most on this machine, "
                                                       "the CPUs this process may use; 1 = in-process")
    memory_budget: Optional[float] = Field(
        None, description="bytes (or '8GiB'), or a fraction of the available memory (0.5); default 0.7 of the "
                          "available memory (RAM, or less under a cgroup memory limit or ulimit -v)")
    backend: Literal["loky", "dask"] = "loky"
    scheduler: Optional[str] = Field(None, description="Dask scheduler address, e.g. tcp://127.0.0.1:8786")
    cluster: ClusterOptions = Field(default_factory=ClusterOptions,
                                    description="cluster runs: SLURM arrays (slurm), Dask workers as SLURM jobs (jobqueue)")
    dicom: DicomOptions = Field(default_factory=DicomOptions, description="DICOM series: what goes into the log")
    qc: QcOptions = Field(default_factory=QcOptions,
                          description="quality control: true (figures measured during run), or its options")
    dataset: DatasetOptions = Field(default_factory=DatasetOptions,
                                    description="training sets (to: preprocess): split into train/val/test or folds")
    source: Optional[Path] = Field(None, description="the config file (set by load_config)")

    _log = field_validator("log", mode="before")(resolve_path)
    _mem = field_validator("memory_budget", mode="before")(lambda v: _size(v))
    _qc = field_validator("qc", mode="before")(qc_options)

    @field_validator("dataset")
    @classmethod
    def _dataset_for_preprocess(cls, v, info: ValidationInfo):
        to = getattr(info.data.get("convert"), "to", None)
        if v.split is not None and to is not None and to != "preprocess":
            raise ValueError(f"dataset.split applies to convert.to: preprocess (the run writes dataset.json and "
                             f"splits.json), found convert.to: {to}")
        return v

    @property
    def log_path(self) -> Path:
        """The CSV log path (default ``<output.root>/niconv_log.csv``)."""
        return self.log or self.output.root / "niconv_log.csv"

    @property
    def n_jobs(self) -> int:
        """Worker count: ``jobs``, or every CPU this process may use (:func:`niconv.limits.usable_cpus`)."""
        return self.jobs or usable_cpus()


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> Config:
    """Read and validate a YAML config.

    Parameters
    ----------
    path : str or path-like
        The YAML file; relative paths inside resolve against its folder.
    overrides : dict, optional
        Top-level keys that replace the file's (e.g. ``{"jobs": 2}`` from the CLI).

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, or any key is invalid; ``errors``
        lists every problem as ``(key path, message)``.
    """
    p = Path(path)
    text = _read_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise ConfigError(str(p), "not a config: lists or mappings nested too deeply to read") from exc
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(str(p), f"not valid YAML: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(p), f"expected a mapping of keys (input, output, convert, ...), found {type(data).__name__}")
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    data["source"] = str(p.resolve())
    return validate(data, base=p.resolve().parent, where=str(p))


def _read_text(p: Path) -> str:
    """The config file's text: at most :data:`MAX_CONFIG_BYTES`, UTF-8."""
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read config: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(p), f"the file is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few kB "
                                  "(is this the right file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{p}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                         "save the config as UTF-8") from exc


def _check_expansion(data: Any, where: str) -> None:
    """Refuse a document that stands for more than :data:`MAX_CONFIG_VALUES` values once its
    aliases are expanded, or that contains itself, before anything walks through it."""
    sizes: dict[int, int] = {}  # by id: each shared list or mapping is counted once, then reused
    inside: set[int] = set()

    def count(node: Any) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in inside:
            raise ConfigError(where, "a YAML alias (*name) refers to a list or mapping that contains it, "
                                     "so the config never ends")
        inside.add(key)
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += count(child)
            if total > MAX_CONFIG_VALUES:
                break
        inside.discard(key)
        sizes[key] = min(total, MAX_CONFIG_VALUES + 1)
        return sizes[key]

    try:
        total = count(data)
    except RecursionError as exc:
        raise ConfigError(where, "not a config: lists or mappings nested too deeply to read") from exc
    if total > MAX_CONFIG_VALUES:
        raise ConfigError(where, f"the config stands for more than {MAX_CONFIG_VALUES} values once its YAML "
                                 "aliases (*name) are expanded; a config has a few dozen")


def validate(data: dict, base: str | os.PathLike = ".", where: str = "<config>") -> Config:
    """Validate an already-parsed config mapping (see :func:`load_config`).

    Raises
    ------
    ConfigError
        If the mapping holds more than :data:`MAX_CONFIG_VALUES` values (aliases
        expanded) or contains itself, or any key is invalid.
    """
    _check_expansion(data, where)
    config = validated(Config, data, where=where, context={"base": str(base)})
    problems = _subject_problems(config)
    if problems:
        raise config_error(problems, where)
    return config


def _subject_problems(config: Config) -> list[tuple[str, str]]:
    """``(key, message)`` for the keys whose meaning depends on ``input.subject``.

    ``convert.labels`` has two readings: with ``input.subject`` it names the
    label channel (``seg``); without, it is the pairing pattern of each image's
    label map (``{stem}_seg.nii.gz``).
    """
    from .converters.preprocess import is_channel_name  # here: only preprocess has these keys

    spec, conv = config.input.subject, config.convert
    if spec is None:
        if conv.to == "preprocess" and conv.labels is not None and is_channel_name(conv.labels):
            return [("convert.labels", f"{conv.labels!r} names a label channel, which needs input.subject; to pair "
                                       f"each image with its label map, give a pattern such as "
                                       f"'{{stem}}_{conv.labels}.nii.gz'")]
        used = [k for k in ("channels", "align", "tolerance") if getattr(conv, k, None) is not None]
        return [(f"convert.{k}", "applies to subjects only: set input.subject too") for k in used]
    if conv.to != "preprocess":
        return [("input.subject", f"subjects are converted by to: preprocess only, found to: {conv.to}")]
    problems = []
    if conv.labels is not None and not is_channel_name(conv.labels):
        problems.append(("convert.labels", f"with input.subject, labels names the label channel (e.g. seg), "
                                           f"found the pairing pattern {show(conv.labels)}"))
    if config.input.label_maps:
        problems.append(("input.label_maps", "does not apply with input.subject: a subject's label map is its "
                                             "label channel (convert.labels)"))
    if conv.labels_root is not None:
        problems.append(("convert.labels_root", "does not apply with input.subject: the label map is one of a "
                                                "subject's files"))
    if spec not in ("nnunet", "msd") and not conv.channels:
        problems.append(("convert.channels", f"expected the channel names in C-axis order (e.g. [t1, t1ce, t2, "
                                             f"flair]): input.subject {spec!r} needs them"))
    if conv.channels and conv.labels in conv.channels:
        problems.append(("convert.labels", f"{conv.labels!r} is also in convert.channels; the label channel is "
                                           f"not an image channel"))
    return problems
