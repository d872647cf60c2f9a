"""``niconv report``: one self-contained HTML page of a run, its QC flags, and JSON findings.

The page (``report.html`` beside the log) holds a summary with small inline
SVG plots, a sortable and filterable table of every task, a thumbnail per
volume (mid-slices of the three planes; a label map coloured over its image)
and the failed and skipped tasks with their messages. Thumbnails are small
PNG files in ``report_files/`` beside it, loaded lazily; nothing is fetched
from the network. Figures come from the log (``qc: true``) or are measured
here, in parallel, and kept per task in ``report.cache.json`` beside the
page, so a report that is stopped resumes where it was.
"""
from __future__ import annotations

import html
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import qc
from .errors import ConfigError
from .log import latest_by_task, read_log
from .writers import atomic_output, own_file_problem

REPORT_NAME, CACHE_NAME, FILES_NAME = "report.html", "report.cache.json", "report_files"
#: First bytes of every page niconv writes: a file with the report's name that lacks them is not ours.
MARKER = "<!DOCTYPE html>\n<!-- niconv report -->"
#: Longest side of one plane of a thumbnail, in pixels.
THUMB_SIDE = 72
#: How often the cache is written while volumes are measured (seconds).
CACHE_SECONDS = 2.0


@dataclass
class Entry:
    """One task on the page: its latest log row (or none yet), and what QC found."""

    task_id: str
    row: dict
    label_map: bool = False
    label_path: str | None = None
    volume: str | None = None
    figures: dict | None = None
    label_figures: dict | None = None
    error: str = ""
    thumb: str = ""
    flags: list = field(default_factory=list)


@dataclass
class Report:
    """What ``niconv report`` made."""

    html_path: Path
    entries: list[Entry]
    counts: dict
    measured: int
    cached: int
    damaged_lines: int
    seconds: float

    def findings(self) -> list[dict]:
        """Every flag raised, one dict per file and flag (the ``--json`` findings)."""
        return [{"task_id": e.task_id, "path": e.volume or e.row.get("input_path", ""), **f.as_dict()}
                for e in self.entries for f in e.flags]


# ------------------------------------------------------------------------------------ gathering


def is_log(path: str | os.PathLike) -> bool:
    """True if ``path`` is a CSV log (starts with niconv's header), False for anything else."""
    try:
        with open(path, "rb") as f:
            return f.read(16).startswith(b"task_id,status,")
    except OSError:
        return False


def gather_from_config(config, tasks) -> tuple[list[Entry], Path, qc.QcOptions, int]:
    """Entries of every task of a manifest (``pending`` where no row is logged yet), across shard logs."""
    from .runfiles import log_files

    logs = [read_log(p) for p in log_files(config.log_path)]
    latest = latest_by_task(r for log in logs for r in log.rows)
    options = config.qc
    entries = []
    for t in tasks:
        row = latest.get(t.task_id) or {"task_id": t.task_id, "status": "pending", "converter": t.converter,
                                          "input_path": t.input_path, "output_path": t.output_path}
        label = t.pair("label")
        if label is None and options.labels and not t.label_map:
            label = _qc_pair(t.input_path, t.rel_path, options)
        entries.append(Entry(t.task_id, row, t.label_map, label))
    return entries, Path(config.log_path), options, sum(log.damaged_lines for log in logs)


def gather_from_log(path: Path) -> tuple[list[Entry], Path, qc.QcOptions, int]:
    """Entries of a log's latest row per output (the current state of each), with the QC options
    of the run record beside it when there is one."""
    from .runfiles import run_record_path

    logged = read_log(path)
    latest = {r["output_path"] or r["task_id"]: r for r in logged.rows}
    options, roots = qc.QcOptions(), []
    try:
        record = json.loads(run_record_path(path).read_text(encoding="utf-8"))
        options = qc.QcOptions.model_validate(qc.qc_options(record["config"].get("qc")))
        roots = record["config"]["input"]["root"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    entries = []
    for row in latest.values():
        details = _details(row)
        label_map = bool(details.get("label_map"))
        label = (details.get("label") or {}).get("path") if isinstance(details.get("label"), dict) else None
        if label is None and options.labels and not label_map:
            root = next((r for r in roots if _within(row["input_path"], r)), None)
            if root:
                label = _qc_pair(row["input_path"], os.path.relpath(row["input_path"], root), options)
        entries.append(Entry(row["task_id"], row, label_map, label))
    return entries, path, options, logged.damaged_lines


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)


def _qc_pair(input_path: str, rel: str, options: qc.QcOptions) -> str | None:
    from .scan import AmbiguousPair, find_pair

    root = Path(input_path[: len(input_path) - len(rel)] if input_path.endswith(rel) else Path(input_path).parent)
    try:
        return find_pair(root, rel, (options.labels, options.labels_root))
    except AmbiguousPair:
        return None


def _details(row: dict) -> dict:
    try:
        d = json.loads(row.get("details") or "{}")
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


# ------------------------------------------------------------------------------------ measuring


def _identity(path: str | None) -> list:
    if not path:
        return [None]
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _cache_key(e: Entry, thumbs: bool) -> str:
    return json.dumps([qc.FIGURES_VERSION, _identity(e.volume), _identity(e.label_path), e.label_map, thumbs])


def measure_entry(volume: str, label_path: str | None, label_map: bool, thumb_path: str | None,
                  figures: dict | None, label_figures: dict | None) -> dict:
    """One task's QC work in a worker: the figures not yet known, and its thumbnail.

    Returns
    -------
    dict
        ``figures``, ``label_figures`` (or None), ``thumb`` (written or not) and ``error``.
    """
    from .errors import NiconvError
    from .volume import read_volume

    out: dict[str, Any] = {"figures": figures, "label_figures": label_figures, "thumb": False, "error": ""}
    try:
        vol = read_volume(volume)
        if figures is None:
            out["figures"] = qc.measure(volume, label_map, vol.data, vol.image)
        lab = None
        if label_path:
            try:
                lab = read_volume(label_path)
                if label_figures is None:
                    out["label_figures"] = qc.measure(label_path, True, lab.data, lab.image)
            except NiconvError as exc:
                out["label_figures"] = {"error": str(exc)}
        if thumb_path:
            png = thumbnail(vol, lab, label_map)
            with atomic_output(thumb_path) as tmp:
                Path(tmp).write_bytes(png)
            out["thumb"] = True
    except NiconvError as exc:
        out["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a file QC trips over costs only its line of the report
        out["error"] = f"{volume}: cannot measure: {type(exc).__name__}: {exc}"
    return out


def _measure_batch(jobs: list[tuple]) -> list[tuple[int, dict]]:
    return [(i, measure_entry(*args)) for i, args in jobs]


def measure_all(entries: list[Entry], folder: Path, cache_path: Path, jobs: int, thumbs: bool,
                progress: Callable[[int], None] = lambda n: None) -> tuple[int, int]:
    """Fill in figures and thumbnails of the ok entries, from the log, the cache, or measured in parallel.

    Returns
    -------
    (int, int)
        Volumes measured now, and taken from the cache.
    """
    cache = _read_cache(cache_path)
    ok = [(n, e) for n, e in enumerate(entries) if e.row.get("status") == "ok"]
    for _, e in ok:
        e.volume = qc.volume_path(e.row.get("converter", ""), e.row.get("input_path", ""),
                                  e.row.get("output_path", ""))
        e.figures = _usable((_details(e.row).get("qc") or {}).get("volume"))
    # a label map that is a task of its own may have its figures in its own row
    by_path = {e.volume: e.figures for _, e in ok if e.figures}
    todo, cached = [], 0
    for n, e in ok:
        if e.volume is None:
            continue
        logged = _details(e.row).get("qc") or {}
        if e.label_path:
            same = (logged.get("label") or {}).get("path") == e.label_path
            e.label_figures = _usable(logged["label"].get("figures")) if same else by_path.get(e.label_path)
        key = _cache_key(e, thumbs)
        hit = cache.get(e.task_id)
        thumb = folder / f"{e.task_id}.png"
        if hit and hit.get("key") == key and (not thumbs or thumb.exists()):
            e.figures = e.figures or hit.get("figures")
            e.label_figures = e.label_figures or hit.get("label_figures")
            e.error, e.thumb = hit.get("error", ""), hit.get("thumb", "")
            cached += 1
            continue
        if not (thumbs or e.figures is None or (e.label_path and e.label_figures is None)):
            continue
        todo.append((n, (e.volume, e.label_path, e.label_map, str(thumb) if thumbs else None,
                         e.figures, e.label_figures)))
    if not todo:
        return 0, cached
    last = time.monotonic()
    done = 0
    for n, result in _run(todo, jobs):
        e = entries[n]
        e.figures = _usable(result["figures"])
        e.label_figures = result["label_figures"]
        e.error = result["error"]
        e.thumb = f"{FILES_NAME}/{e.task_id}.png" if result["thumb"] else ""
        cache[e.task_id] = {"key": _cache_key(e, thumbs), "figures": e.figures, "label_figures": e.label_figures,
                            "error": e.error, "thumb": e.thumb}
        done += 1
        progress(done)
        if time.monotonic() - last > CACHE_SECONDS:
            _write_cache(cache_path, cache)
            last = time.monotonic()
    _write_cache(cache_path, cache)
    return len(todo), cached


def _run(todo: list[tuple], jobs: int):
    """``measure_entry`` over ``todo`` in worker processes (in-process for one job), results as they come."""
    if jobs <= 1 or len(todo) == 1:
        for n, args in todo:
            yield n, measure_entry(*args)
        return
    from joblib import delayed

    from .dispatch import processes

    size = max(1, min(16, len(todo) // (4 * jobs)))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    gen = processes(jobs, return_as="generator_unordered", batch_size=1)(
        delayed(_measure_batch)(c) for c in chunks)
    try:
        for results in gen:
            yield from results
    finally:
        gen.close()


def _usable(figures) -> dict | None:
    return figures if isinstance(figures, dict) and figures.get("version") == qc.FIGURES_VERSION else None


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("tasks", {}) if isinstance(data, dict) and data.get("niconv_report_cache") == 1 else {}


def _write_cache(path: Path, cache: dict) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump({"niconv_report_cache": 1, "tasks": cache}, f, separators=(",", ":"))


# ------------------------------------------------------------------------------------ thumbnails


def thumbnail(vol, label=None, label_map: bool = False) -> bytes:
    """A PNG of the mid-slices of the three planes side by side (axial, coronal, sagittal;
    radiological, square pixels in mm), longest side :data:`THUMB_SIDE` pixels each. A label
    map is shown in colour; a paired label map is coloured over its image, each voxel placed
    by the two affines (so a label map on another grid shows where it really lies)."""
    import io

    from PIL import Image

    from .ops import planes as P
    from .ops.window import apply_window, label_colors, percentile_window

    data = qc._numeric(vol.data)
    rgb = vol.data.dtype.names is not None
    if rgb:
        data = data[..., :3]
    while data.ndim > (4 if rgb else 3):
        data = data[..., 0] if not rgb else data[..., 0, :]
    if data.ndim == 2:
        data = data[:, :, None]
    label_map = label_map or _label_intent(vol)
    ras, affine, spacing = P.to_ras(data, vol.affine)
    if rgb:
        pixels = np.clip(ras, 0, 255).astype(np.uint8)
    elif label_map:
        pixels = label_colors(np.arange(256))[np.mod(np.nan_to_num(ras).astype(np.int64), 256)]
    else:
        pixels = apply_window(ras, percentile_window(ras), 8)
    overlay = None
    if label is not None:
        overlay = _label_on_grid(label, affine, ras.shape[:3])
    tiles = []
    for plane in P.PLANES:
        i = ras.shape[P.SLICE_AXIS[plane]] // 2
        img = np.ascontiguousarray(P.get_slice(pixels, plane, i))
        if overlay is not None:
            lab = P.get_slice(overlay, plane, i)
            base = np.repeat(img[..., None], 3, axis=-1).astype(np.float32) if img.ndim == 2 else img.astype(np.float32)
            colour = label_colors(np.arange(256))[np.mod(lab, 256)].astype(np.float32)
            on = (lab != 0)[..., None]
            img = np.where(on, 0.45 * base + 0.55 * colour, base).astype(np.uint8)
        rows, cols = P.display_shape(pixels.shape, spacing, plane)
        scale = THUMB_SIDE / max(rows, cols)
        size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        nearest = label_map or overlay is not None
        tiles.append(P.resample(img, size, "nearest" if nearest else "linear").convert("RGB"))
    sheet = Image.new("RGB", (sum(t.size[0] for t in tiles) + 2 * (len(tiles) - 1), max(t.size[1] for t in tiles)))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, (sheet.size[1] - t.size[1]) // 2))
        x += t.size[0] + 2
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _label_intent(vol) -> bool:
    """A NIfTI label-intent file: shown in colour like a listed label map."""
    try:
        return vol.image.header.get_intent()[0] == "label"
    except Exception:  # noqa: BLE001 - not NIfTI, or an unknown intent code
        return False


def _label_on_grid(label, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The label map sampled (nearest voxel) on the image's RAS+ grid, mid-slices only; 0 outside it."""
    lab = qc._numeric(label.data)
    while lab.ndim > 3:
        lab = lab[..., 0]
    lab = np.nan_to_num(lab).astype(np.int64)
    to_label = np.linalg.inv(label.affine) @ affine
    out = np.zeros(shape, dtype=np.int64)
    mids = [s // 2 for s in shape]
    for axis in range(3):
        idx = [np.arange(s) for s in shape]
        idx[axis] = np.array([mids[axis]])
        grid = np.stack(np.meshgrid(*idx, indexing="ij"), axis=-1).reshape(-1, 3)
        ijk = np.rint(grid @ to_label[:3, :3].T + to_label[:3, 3]).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.array(lab.shape[:3])), axis=1)
        values = np.zeros(len(grid), dtype=np.int64)
        values[ok] = lab[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]]
        out[grid[:, 0], grid[:, 1], grid[:, 2]] = values
    return out


# ------------------------------------------------------------------------------------ the report


def check_report_paths(folder: Path) -> None:
    """Refuse to replace a ``report.html`` or cache that niconv did not write, or to write through a link.

    Raises
    ------
    ConfigError
        Naming the file that is in the way: not niconv's, or a symbolic link
        (for the thumbnails' folder too), which would put the report's files
        elsewhere or replace the link.
    """
    page, cache = folder / REPORT_NAME, folder / CACHE_NAME
    thumbs = folder / FILES_NAME
    for path in (page, cache, thumbs):
        if os.path.islink(path):
            raise ConfigError(str(path), f"the report's {'folder' if path == thumbs else 'file'} name is taken by "
                                         f"{own_file_problem(path)}; niconv never writes through a link: remove it")
    if page.exists():
        with open(page, "rb") as f:
            if not f.read(len(MARKER)).decode("utf-8", "replace").startswith(MARKER):
                raise ConfigError(str(page), "a file with the report's name is there and it is not a niconv report; "
                                             "move it away (niconv replaces only its own report)")
    if cache.exists():
        try:
            ours = json.loads(cache.read_text(encoding="utf-8")).get("niconv_report_cache") == 1
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(str(cache), "a file with the report cache's name is there and it is not niconv's; "
                                          "move it away")


def build_report(entries: list[Entry], log_path: Path, options: qc.QcOptions, damaged: int, *, jobs: int = 1,
                 thumbs: bool = True, progress: Callable[[int], None] = lambda n: None) -> Report:
    """Measure, check and write ``report.html`` beside the log.

    Parameters
    ----------
    entries : list of Entry
        From :func:`gather_from_config` or :func:`gather_from_log`.
    log_path : Path
        The log; the page, its cache and thumbnail folder go beside it.
    options : niconv.qc.QcOptions
    damaged : int
        Damaged log lines skipped (said on the page).
    jobs : int
        Worker processes measuring volumes.
    thumbs : bool
        Make thumbnails (each volume is read); without, only volumes lacking figures are read.

    Raises
    ------
    ConfigError
        If a file niconv did not write has the page's or cache's name.
    """
    start = time.monotonic()
    folder = Path(log_path).parent
    check_report_paths(folder)
    measured, cached = measure_all(entries, folder / FILES_NAME, folder / CACHE_NAME, jobs, thumbs, progress)
    items = []
    for e in entries:
        if e.figures is None:
            continue
        label = {"path": e.label_path, "figures": _usable(e.label_figures)} if e.label_path else None
        items.append(qc.Item(e.task_id, e.volume, e.figures, label, e.label_map))
    qc.run_checks(items, options)
    by_key = {i.key: i for i in items}
    for e in entries:
        e.flags = by_key[e.task_id].flags if e.task_id in by_key else []
    counts = dict(Counter(e.row.get("status", "") for e in entries))
    page = folder / REPORT_NAME
    text = render(entries, log_path, counts, damaged, options)
    with atomic_output(page) as tmp, open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    return Report(page, entries, counts, measured, cached, damaged, round(time.monotonic() - start, 3))


def write_findings(report: Report, path: str | os.PathLike) -> None:
    """The ``--json`` file: counts, every flag with its evidence, the failed and skipped tasks."""
    data = {
        "report": str(report.html_path),
        "tasks": len(report.entries),
        "counts": report.counts,
        "damaged_log_lines": report.damaged_lines,
        "findings": report.findings(),
        "not_measured": [{"task_id": e.task_id, "path": e.volume, "error": e.error}
                         for e in report.entries if e.error],
        "failed": [{"task_id": e.task_id, "path": e.row.get("input_path", ""), "status": e.row["status"],
                    "error_type": e.row.get("error_type", ""), "message": e.row.get("error_message", "")}
                   for e in report.entries if e.row.get("status") in ("failed", "skipped")],
    }
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


# ------------------------------------------------------------------------------------ HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bars(title: str, counts: Counter, flagged: set = frozenset()) -> str:
    """A small horizontal bar chart (inline SVG) of counts by value."""
    items = counts.most_common(12)
    if not items:
        return ""
    top = max(c for _, c in items)
    h = 16 * len(items) + 20
    out = [f'<figure><figcaption>{_esc(title)}</figcaption><svg width="260" height="{h}" role="img">']
    for n, (name, c) in enumerate(items):
        y = 16 + 16 * n
        w = max(1, round(130 * c / top))
        colour = "#d9534f" if name in flagged else "#4a7ab5"
        out.append(f'<text x="0" y="{y + 10}" class="l">{_esc(str(name)[:18])}</text>'
                   f'<rect x="110" y="{y}" width="{w}" height="12" fill="{colour}"/>'
                   f'<text x="{114 + w}" y="{y + 10}" class="l">{c}</text>')
    if len(counts) > len(items):
        out.append(f'<text x="0" y="10" class="l">{len(counts) - len(items)} more not shown</text>')
    out.append("</svg></figure>")
    return "".join(out)


def _hist(title: str, values: list[float]) -> str:
    """A small histogram (inline SVG, log-spaced bins when the values span a decade)."""
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v) and v > 0], dtype=np.float64)
    if vals.size == 0:
        return ""
    lo, hi = float(vals.min()), float(vals.max())
    logbins = hi / lo > 10
    edges = np.geomspace(lo, hi, 13) if logbins and hi > lo else np.linspace(lo, hi if hi > lo else lo + 1, 13)
    counts, _ = np.histogram(vals, bins=edges)
    top = max(int(counts.max()), 1)
    out = [f'<figure><figcaption>{_esc(title)}</figcaption><svg width="260" height="90" role="img">']
    for n, c in enumerate(counts):
        hgt = round(60 * c / top)
        out.append(f'<rect x="{8 + 20 * n}" y="{66 - hgt}" width="18" height="{hgt}" fill="#4a7ab5">'
                   f'<title>{edges[n]:.3g} to {edges[n + 1]:.3g}: {int(c)}</title></rect>')
    out.append(f'<text x="4" y="84" class="l">{lo:.3g}</text>'
               f'<text x="250" y="84" class="l" text-anchor="end">{hi:.3g}</text></svg></figure>')
    return "".join(out)


def _table_rows(entries: list[Entry]) -> list[dict]:
    rows = []
    for e in entries:
        r, f = e.row, e.figures or {}
        spacing = f.get("zooms") or [float(z) for z in (r.get("zooms") or "").split("x")[:3] if _isnum(z)]
        rows.append({
            "id": e.task_id, "status": r.get("status", ""), "file": r.get("input_path", ""),
            "out": r.get("output_path", ""), "conv": r.get("converter", ""),
            "shape": "x".join(map(str, f["shape"])) if f.get("shape") else r.get("input_shape", ""),
            "voxels": f.get("voxels"),
            "spacing": "x".join(f"{z:g}" for z in spacing), "sp": _finite(max(spacing)) if spacing else None,
            "ax": f.get("axcodes") or r.get("axcodes", ""), "dtype": r.get("input_dtype", "") or f.get("dtype", ""),
            "min": _finite(f.get("min")), "max": _finite(f.get("max")),
            "flags": [fl.name for fl in e.flags],
            "why": [fl.message for fl in e.flags],
            "msg": r.get("error_message", "") or e.error,
            "label": "label map" if e.label_map else (e.label_path or ""),
            "thumb": e.thumb,
        })
    return rows


def _finite(x):
    """A number the page's JSON can hold (NaN and infinity cannot be JSON), else None."""
    return x if isinstance(x, (int, float)) and np.isfinite(x) else None


def _isnum(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _json_for_script(data) -> str:
    """JSON that cannot end its ``<script>`` element: ``<``, ``>`` and ``&`` escaped."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _fmt(entries: list[Entry]) -> Counter:
    suffixes = Counter()
    for e in entries:
        path = e.row.get("input_path", "")
        name = Path(path).name.lower()
        if os.path.isdir(path):
            ext = "DICOM series"  # a series' input is its folder
        else:
            ext = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix or "(none)"
        suffixes[ext] += 1
    return suffixes


def render(entries: list[Entry], log_path: Path, counts: dict, damaged: int, options: qc.QcOptions) -> str:
    """The page's HTML: every value from the files escaped, the table's data as JSON built into the DOM as text."""
    ok = [e for e in entries if e.figures]
    flag_counts = Counter(fl.name for e in entries for fl in e.flags)
    spacings = [qc._spatial(e.figures, "zooms") for e in ok]
    shapes = [qc._spatial(e.figures, "shape") for e in ok]
    plots = [
        _bars("tasks by status", Counter(counts), {"failed"}),
        _bars("flags", flag_counts, set(flag_counts)),
        _bars("input formats", _fmt(entries)),
        _bars("dtypes", Counter(e.row.get("input_dtype") or "?" for e in entries if e.row.get("status") == "ok")),
        _bars("orientations", Counter(e.figures["axcodes"] for e in ok),
              {fl.evidence.get("axcodes") for e in ok for fl in e.flags if fl.name == "orientation"}),
    ]
    for axis, name in enumerate("RAS"):
        plots.append(_hist(f"spacing along {name} (mm)", [s[axis] for s in spacings if len(s) > axis]))
    for axis, name in enumerate("RAS"):
        plots.append(_hist(f"voxels along {name}", [s[axis] for s in shapes if len(s) > axis]))
    problems = [e for e in entries if e.row.get("status") in ("failed", "skipped")]
    problem_rows = "".join(
        f"<tr><td>{_esc(e.row['status'])}</td><td>{_esc(e.row.get('input_path', ''))}</td>"
        f"<td>{_esc(e.row.get('error_type', ''))}</td><td>{_esc(e.row.get('error_message', ''))}</td></tr>"
        for e in problems)
    summary = ", ".join(f"{c} {_esc(s)}" for s, c in sorted(counts.items()))
    notes = []
    if damaged:
        notes.append(f"{damaged} damaged log line(s) skipped.")
    if counts.get("pending"):
        notes.append(f"{counts['pending']} task(s) have no log row yet (the run is going on, or was stopped).")
    unmeasured = sum(1 for e in entries if e.error)
    if unmeasured:
        notes.append(f"{unmeasured} volume(s) could not be measured (see the message column).")
    legend = "".join(f"<li><b>{_esc(c.name)}</b>: {_esc(c.title)}</li>" for c in qc.CHECKS.values())
    flag_options = "".join(f'<option value="{_esc(n)}">{_esc(n)} ({flag_counts.get(n, 0)})</option>'
                           for n in qc.CHECKS)
    status_options = "".join(f'<option value="{_esc(s)}">{_esc(s)}</option>' for s in sorted(counts))
    data = _json_for_script(_table_rows(entries))
    return f"""{MARKER}
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>niconv report: {_esc(log_path.name)}</title>
<style>{_CSS}</style></head><body>
<h1>niconv report</h1>
<p class="meta">log {_esc(log_path)}: {len(entries)} task(s): {summary}; {sum(flag_counts.values())} flag(s) on
{sum(1 for e in entries if e.flags)} file(s). {' '.join(_esc(n) for n in notes)}</p>
<section class="plots">{''.join(plots)}</section>
<details><summary>What raises each flag</summary><ul>{legend}</ul></details>
<h2>Tasks</h2>
<div class="controls"><input id="q" type="search" placeholder="filter: file, flag, message" aria-label="filter">
<select id="st" aria-label="status"><option value="">every status</option>{status_options}</select>
<select id="fl" aria-label="flag"><option value="">any flag or none</option><option value="*">flagged</option>
{flag_options}</select> <span id="shown"></span></div>
<table id="tasks"><thead><tr>
<th data-k="thumb">thumbnail</th><th data-k="file">file</th><th data-k="status">status</th>
<th data-k="voxels">shape</th><th data-k="sp">spacing (mm)</th><th data-k="ax">orientation</th>
<th data-k="dtype">dtype</th><th data-k="min">range</th><th data-k="flags">flags</th><th data-k="msg">message</th>
</tr></thead><tbody></tbody></table>
<h2>Failed and skipped tasks ({len(problems)})</h2>
<table class="problems"><thead><tr><th>status</th><th>file</th><th>error</th><th>message</th></tr></thead>
<tbody>{problem_rows}</tbody></table>
<script type="application/json" id="data">{data}</script>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{margin:0 0 .2em}.meta{color:#555}
.plots{display:flex;flex-wrap:wrap;gap:.5em 1.5em}
figure{margin:0}figcaption{font-weight:600;font-size:12px}
svg .l{font-size:10px;fill:#333}
.controls{margin:.5em 0;display:flex;gap:.5em;align-items:center}
#q{width:22em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;font-size:12px}
#tasks th{cursor:pointer;background:#f3f3f3;position:sticky;top:0}
#tasks th.asc:after{content:" \\25B2"}#tasks th.desc:after{content:" \\25BC"}
td.file{min-width:16em;max-width:26em;overflow-wrap:anywhere}td.file small{color:#777}
td.msg{min-width:14em;max-width:32em}
td img{height:60px;image-rendering:auto;background:#000}
.flag{display:inline-block;background:#d9534f;color:#fff;border-radius:3px;padding:0 4px;margin:1px;font-size:11px}
.s-failed{color:#b00;font-weight:600}.s-skipped{color:#888}.s-pending{color:#a60}
"""

_JS = r"""
(function(){
"use strict";
var rows=JSON.parse(document.getElementById("data").textContent);
var body=document.querySelector("#tasks tbody");
var key=null,dir=1;
function el(tag,text,cls){var e=document.createElement(tag);if(text!==undefined&&text!==null)e.textContent=String(text);if(cls)e.className=cls;return e;}
function range(r){return r.min===null||r.min===undefined?"":r.min+" to "+r.max;}
function build(r){
  var tr=document.createElement("tr");
  var td=el("td");
  if(r.thumb){var img=document.createElement("img");img.loading="lazy";img.alt="";img.src=r.thumb;td.appendChild(img);}
  tr.appendChild(td);
  var cut=r.file.lastIndexOf("/"),f=el("td",undefined,"file");
  f.appendChild(el("b",r.file.slice(cut+1)));f.appendChild(document.createElement("br"));
  f.appendChild(el("small",r.file.slice(0,cut+1)));f.title=r.out?("output: "+r.out):"";tr.dataset.file=r.file;
  if(r.label){f.appendChild(document.createElement("br"));f.appendChild(el("small",r.label==="label map"?"(label map)":"label: "+r.label));}
  tr.appendChild(f);
  tr.appendChild(el("td",r.status,"s-"+r.status));
  tr.appendChild(el("td",r.shape));tr.appendChild(el("td",r.spacing));tr.appendChild(el("td",r.ax));
  tr.appendChild(el("td",r.dtype));tr.appendChild(el("td",range(r)));
  var fl=el("td");
  r.flags.forEach(function(n,i){var s=el("span",n,"flag");s.title=r.why[i];fl.appendChild(s);});
  tr.appendChild(fl);
  tr.appendChild(el("td",r.why.concat(r.msg?[r.msg]:[]).join("; "),"msg"));
  r.text=(r.file+" "+r.flags.join(" ")+" "+r.why.join(" ")+" "+r.msg+" "+r.label).toLowerCase();
  r.tr=tr;return tr;
}
var frag=document.createDocumentFragment();
rows.forEach(function(r){frag.appendChild(build(r));});
body.appendChild(frag);
function value(r,k){var v=r[k];if(k==="flags")return v.length;return v===undefined?null:v;}
function compare(a,b){
  var x=value(a,key),y=value(b,key);
  if(x===y)return 0;if(x===null||x==="")return 1;if(y===null||y==="")return -1;
  if(typeof x==="number"&&typeof y==="number")return (x-y)*dir;
  return String(x).localeCompare(String(y))*dir;
}
document.querySelectorAll("#tasks th").forEach(function(th){
  th.addEventListener("click",function(){
    var k=th.getAttribute("data-k");dir=(key===k)?-dir:1;key=k;
    document.querySelectorAll("#tasks th").forEach(function(h){h.className="";});
    th.className=dir>0?"asc":"desc";
    var sorted=rows.slice().sort(compare);var f=document.createDocumentFragment();
    sorted.forEach(function(r){f.appendChild(r.tr);});body.appendChild(f);
  });
});
var q=document.getElementById("q"),st=document.getElementById("st"),fs=document.getElementById("fl");
function filter(){
  var text=q.value.trim().toLowerCase(),s=st.value,f=fs.value,n=0;
  rows.forEach(function(r){
    var show=(!text||r.text.indexOf(text)>=0)&&(!s||r.status===s)&&(!f||(f==="*"?r.flags.length>0:r.flags.indexOf(f)>=0));
    r.tr.hidden=!show;if(show)n++;
  });
  document.getElementById("shown").textContent=n+" of "+rows.length+" shown";
}
q.addEventListener("input",filter);st.addEventListener("change",filter);fs.addEventListener("change",filter);
filter();
})();
"""


def fail_lines(report: Report, names: list[str]) -> list[str]:
    """One line per file raising any of ``names``: ``PATH: flag (message); flag (message)``."""
    lines = []
    for e in report.entries:
        hits = [f for f in e.flags if f.name in names]
        if hits:
            lines.append(f"{e.volume or e.row.get('input_path', '')}: "
                         + "; ".join(f"{f.name} ({f.message})" for f in hits))
    return lines


def check_fail_on(text: str) -> list[str]:
    """``--fail-on orientation,geometry`` as flag names.

    Raises
    ------
    ConfigError
        For an unknown flag, with the closest name.
    """
    from .schema import did_you_mean

    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in qc.CHECKS:
            raise ConfigError("--fail-on", f"expected flags from {', '.join(qc.CHECKS)}, found {n!r}"
                                           f"{did_you_mean(n, list(qc.CHECKS))}")
    return names

