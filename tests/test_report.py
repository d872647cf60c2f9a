"""``niconv report``: the page of a run, of a killed run's log, of a run in progress; hostile names; the page in
a real browser (headless Chromium driven by selenium): no console errors, one row per task, sorting, filtering."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers import COHORT, niconv, write_config
from niconv.log import read_log

# a folder and a file name that are HTML (the first path holds a whole <script> element)
HOSTILE = ['<script>window.pwned=1<', '<script>window.pwned=1</script>.nii',
           '<img src=x onerror="window.pwned=2">.nii']


def cohort_copy(folder: Path, hostile: bool = True) -> Path:
    """The real cohort's NIfTI, MGH, MINC, Analyze and PAR/REC files (DICOM too: skipped tasks), plus
    two copies under names that are HTML."""
    if not COHORT.is_dir():
        pytest.skip(f"real test data not found at {COHORT}")
    shutil.copytree(COHORT, folder)
    if hostile:
        (folder / "truncated.nii.gz").write_bytes((COHORT / "sct_t2s.nii.gz").read_bytes()[:3000])  # fails
        (folder / HOSTILE[0]).mkdir()
        for name in HOSTILE[1:]:
            shutil.copyfile(COHORT / "nib_anatomical.nii", folder / name)
    return folder


def measured(rows: list[dict]) -> int:
    """The ok rows with a volume to measure: an image file (a DICOM series converted to .npz has none)."""
    return sum(1 for r in rows if r["status"] == "ok" and Path(r["input_path"]).is_file())


def config(tmp_path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, f"""
input:
  root: {tmp_path / 'in'}
output:
  root: {tmp_path / 'out'}
jobs: 2
{extra}
convert:
  to: numpy
""")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The cohort (with the hostile names) converted once, and its report written."""
    tmp = tmp_path_factory.mktemp("report")
    cohort_copy(tmp / "in")
    cfg = config(tmp)
    r = niconv("run", cfg, "--quiet")
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stderr  # the truncated copy
    r = niconv("report", cfg, "--json", tmp / "findings.json")
    assert r.returncode == 0, r.stderr
    return tmp, cfg


def test_report_has_every_task_and_escapes_hostile_names(converted):
    tmp, _ = converted
    page = (tmp / "out" / "report.html").read_text(encoding="utf-8")
    rows = read_log(tmp / "out" / "niconv_log.csv").rows
    data = json.loads(page.split('<script type="application/json" id="data">')[1].split("</script>")[0])
    assert sorted(r["id"] for r in data) == sorted(r["task_id"] for r in rows)
    assert page.count("<script") == 2 and "<img" not in page  # the page's own two scripts; no tag from a name
    assert "\\u003cscript\\u003ewindow.pwned=1\\u003c/script\\u003e.nii" in page
    # thumbnails: one small PNG per measured volume, beside the page, none fetched from elsewhere
    thumbs = sorted((tmp / "out" / "report_files").glob("*.png"))
    assert len(thumbs) == measured(rows)
    assert all(t.stat().st_size < 40_000 for t in thumbs)
    assert "http://" not in page and "https://" not in page
    found = json.loads((tmp / "findings.json").read_text())
    assert {f["flag"] for f in found["findings"]} >= {"orientation", "oblique", "nonfinite", "duplicate"}
    nonfinite = [f for f in found["findings"] if f["flag"] == "nonfinite"]
    assert [(Path(f["path"]).name, f["evidence"]["nan"]) for f in nonfinite] == [("sct_fmri_tsnr.nii.gz", 408)]
    assert found["counts"] == {"ok": len(rows) - 1, "failed": 1}
    [failed] = found["failed"]
    assert failed["path"].endswith("truncated.nii.gz") and "truncated" in failed["message"]
    problems = page.split("Failed and skipped tasks (1)")[1]
    assert "truncated.nii.gz" in problems and failed["error_type"] in problems


def test_second_report_takes_every_volume_from_the_cache(converted):
    tmp, cfg = converted
    r = niconv("report", cfg)
    assert r.returncode == 0, r.stderr
    ok = measured(read_log(tmp / "out" / "niconv_log.csv").rows)
    assert f"0 volume(s) read, {ok} from the cache" in r.stdout


def test_report_of_a_killed_run_log_with_a_damaged_last_line(tmp_path):
    cohort_copy(tmp_path / "in", hostile=False)
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet").returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:8]) + lines[8][:40])  # killed while writing the 8th row
    r = niconv("report", log, "--json", tmp_path / "f.json")
    assert r.returncode == 0, r.stderr
    assert "report of 7 task(s)" in r.stdout and "1 damaged log line(s) skipped" in r.stdout
    assert "1 damaged log line(s) skipped." in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "f.json").read_text())["damaged_log_lines"] == 1


def test_report_of_a_run_in_progress_shows_pending_tasks(tmp_path):
    cohort_copy(tmp_path / "in", hostile=False)
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet").returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:11]))  # the header and 10 rows so far
    r = niconv("report", cfg)
    assert r.returncode == 0, r.stderr
    total = len(lines) - 1
    assert f"report of {total} task(s)" in r.stdout and f"{total - 10} pending" in r.stdout


def test_a_foreign_report_html_is_never_replaced(tmp_path):
    cohort_copy(tmp_path / "in", hostile=False)
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet").returncode == 0
    mine = tmp_path / "out" / "report.html"
    mine.write_text("<html>my own notes</html>")
    r = niconv("report", cfg)
    assert r.returncode == 2 and "not a niconv report" in r.stderr
    assert mine.read_text() == "<html>my own notes</html>"


# ------------------------------------------------------------------------------------ in a browser


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _visible_files(browser) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#tasks tbody tr')).filter(r => !r.hidden)"
        ".map(r => r.dataset.file);")


def test_report_in_headless_chromium(converted, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    tmp, _ = converted
    rows = read_log(tmp / "out" / "niconv_log.csv").rows
    browser = _browser()
    try:
        start = time.monotonic()
        browser.get((tmp / "out" / "report.html").as_uri())
        assert time.monotonic() - start < 30
        # thumbnails load lazily, as they come into view
        assert browser.execute_script("return Array.from(document.images).every(i => i.loading === 'lazy')")
        browser.execute_script("Array.from(document.images).forEach(i => i.scrollIntoView())")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not browser.execute_script(
                "return Array.from(document.images).every(i => i.complete)"):
            time.sleep(0.2)
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        assert browser.execute_script("return window.pwned") is None
        body = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
        assert len(body) == len(rows)
        files = _visible_files(browser)
        assert {str(tmp / "in" / name) for name in HOSTILE[1:]} <= set(files)  # shown as text
        loaded = browser.execute_script(
            "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == measured(rows)

        header = browser.find_element(By.CSS_SELECTOR, '#tasks th[data-k="file"]')
        ascending = browser.execute_script("return arguments[0].slice().sort((a, b) => a.localeCompare(b));", files)
        assert ascending != files or len(set(files)) < 2
        header.click()
        assert _visible_files(browser) == ascending
        header.click()
        assert _visible_files(browser) == ascending[::-1]
        spacing = browser.find_element(By.CSS_SELECTOR, '#tasks th[data-k="sp"]')
        spacing.click()
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('#tasks tbody tr')).map(r => r.cells[4].textContent)"
            ".filter(t => t).map(t => Math.max(...t.split('x').map(Number)));")
        assert shown == sorted(shown) and len(shown) == sum(1 for r in rows if r["status"] == "ok")

        box = browser.find_element(By.ID, "q")
        box.send_keys("sct_")
        assert sorted(Path(f).name for f in _visible_files(browser)) == ["sct_fmri_tsnr.nii.gz", "sct_t2s.nii.gz"]
        box.clear()
        browser.execute_script("document.getElementById('q').dispatchEvent(new Event('input'))")
        Select(browser.find_element(By.ID, "st")).select_by_value("ok")
        assert len(_visible_files(browser)) == sum(1 for r in rows if r["status"] == "ok")
        Select(browser.find_element(By.ID, "st")).select_by_value("")
        Select(browser.find_element(By.ID, "fl")).select_by_value("nonfinite")
        assert [Path(f).name for f in _visible_files(browser)] == ["sct_fmri_tsnr.nii.gz"]
        Select(browser.find_element(By.ID, "fl")).select_by_value("")
        assert browser.find_element(By.ID, "shown").text == f"{len(rows)} of {len(rows)} shown"
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


def test_thumbnail_colours_a_label_map_where_its_affine_puts_it(tmp_path):
    import io

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from niconv.report import thumbnail
    from niconv.volume import read_volume

    image = read_volume(COHORT / "sct_t2s.nii.gz")
    seg_path = COHORT.parent / "extra" / "sct_t2s_seg_int64.nii.gz"
    if not seg_path.exists():
        pytest.skip(f"test data not found: {seg_path}")
    seg = nib.load(str(seg_path))
    moved = seg.affine.copy()
    moved[:3, 3] += [-4.0, 0.0, 0.0]  # 8 voxels of 0.5 mm towards the left
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), moved, seg.header), str(tmp_path / "moved.nii.gz"))

    def coloured_columns(label) -> np.ndarray:
        rgb = np.asarray(Image.open(io.BytesIO(thumbnail(image, label))).convert("RGB")).astype(int)
        axial = rgb[:, : round(49 * 72 / 54)]  # the first plane: 54 rows (A) scaled to 72 pixels, 49 columns (R)
        return np.nonzero((np.abs(axial[..., 0] - axial[..., 1]) > 20).any(axis=0))[0]

    assert coloured_columns(None).size == 0  # a grey image alone
    here, there = coloured_columns(read_volume(seg_path)), coloured_columns(read_volume(tmp_path / "moved.nii.gz"))
    assert here.size and there.size
    # radiological display: the patient's left is on the image's right; 8 voxels at 72 / 54 pixels each
    assert there.mean() - here.mean() == pytest.approx(8 * 72 / 54, abs=2)
