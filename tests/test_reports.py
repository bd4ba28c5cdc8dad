"""Subject reports built from real DLMUSE label maps, checked as HTML and in headless Chromium."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids.bids import (
    LOGS_DIR,
    Provenance,
    crash_log_name,
    figure_paths,
    image_sidecar,
    output_paths,
    report_path,
    write_dataset_files,
    write_json_atomic,
)
from dlmuse_bids.group import write_group_tables
from dlmuse_bids.io import save_nifti_atomic
from dlmuse_bids.labels import roi_volume_table
from dlmuse_bids.qc import explain, qc_row
from dlmuse_bids.reports.figures import label_colours
from dlmuse_bids.reports.group import ROBUST_Z_LIMIT, robust_z, write_group_report
from dlmuse_bids.reports.subject import KEY_VOLUMES, write_subject_report
from tests.support.paths import DATA_DIR, REPO_ROOT

LABELS = DATA_DIR / "dlmuse_labels"
ARTIFACTS = REPO_ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not LABELS.is_dir(), reason=f"{LABELS} not found (CI has ../shared beside the repo)"
)


class _Page(HTMLParser):
    """The images, links and anchors of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.add(attrs["id"])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _write_outputs(source: Path, labels: np.ndarray, img: nib.Nifti1Image, out: Path, raw: Path):
    """The outputs a run would write for ``source`` given its label map (no network involved)."""
    paths = output_paths(source, out)
    paths["dseg"].parent.mkdir(parents=True, exist_ok=True)
    labels = labels.astype(np.uint8)
    save_nifti_atomic(nib.Nifti1Image(labels, img.affine), paths["dseg"])
    save_nifti_atomic(nib.Nifti1Image((labels > 0).astype(np.uint8), img.affine), paths["mask"])
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    roi_volume_table(labels, zooms).to_csv(paths["volumes"], sep="\t", index=False)
    row = qc_row(labels, zooms, component_outcome="single", orientation="RAS")
    pd.DataFrame([row]).to_csv(paths["qc"], sep="\t", index=False, na_rep="n/a")
    prov = Provenance(
        "1.0",
        {"DLMUSE": {"TestTimeAugmentation": True, "TileStepSize": 0.5, "Precision": "fp32"}},
        {"DLMUSE": {"CheckpointSHA256": {"fold_0": "ab" * 32}}},
    )
    meta = image_sidecar(source, raw, prov, Device="cpu", InferenceSeconds={"DLICV": 1.5})
    write_json_atomic(paths["dseg_json"], meta)
    write_json_atomic(paths["mask_json"], meta)
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """sub-01: two real segmentations (one doctored: left hemisphere erased) and a failed run."""
    root = tmp_path_factory.mktemp("reports")
    raw, out = root / "raw", root / "out"
    out.mkdir()
    write_dataset_files(out, raw, "1.0")
    t1w = nib.load(LABELS / "nichart-Subj1_T1w_2mm.nii.gz")
    labels = np.asarray(nib.load(LABELS / "nichart-Subj1_dseg-DLMUSE_2mm.nii.gz").dataobj)
    sources = {}
    for name in ("run-1", "run-2", "run-3"):
        source = raw / f"sub-01/anat/sub-01_{name}_T1w.nii.gz"
        source.parent.mkdir(parents=True, exist_ok=True)
        nib.save(t1w, source)
        sources[name] = source
    _write_outputs(sources["run-1"], labels, t1w, out, raw)
    doctored = labels.copy()
    lr_axis = [c in "LR" for c in nib.aff2axcodes(t1w.affine)].index(True)
    half = [slice(None)] * 3
    half[lr_axis] = slice(0, labels.shape[lr_axis] // 2)  # one hemisphere's side of the head
    doctored[tuple(half)] = 0
    _write_outputs(sources["run-2"], doctored, t1w, out, raw)
    crash = out / LOGS_DIR / crash_log_name(sources["run-3"], "reorient", "20260101-000000")
    crash.parent.mkdir()
    crash.write_text("image refused\n")
    report = write_subject_report("01", list(sources.values()), out, raw)
    return {"raw": raw, "out": out, "sources": sources, "report": report}


def test_the_report_and_its_figures_are_where_bids_puts_them(dataset):
    out = dataset["out"]
    assert dataset["report"] == report_path(out, "01") == out / "sub-01.html"
    for name in ("run-1", "run-2"):
        figure = figure_paths(dataset["sources"][name], out)["mosaic"]
        assert figure.parent == out / "sub-01" / "figures"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not figure_paths(dataset["sources"]["run-3"], out)["mosaic"].exists()
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "*.html" in ignore and "sub-*/figures" in ignore


def test_every_image_and_link_resolves(dataset):
    out = dataset["out"]
    page = _parse(dataset["report"])
    assert len(page.images) == 2
    for href in page.images + page.links:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
        else:
            assert not re.match(r"^[a-z]+:", href), f"not a relative link: {href}"
            assert (out / href).is_file(), href
    # every output file of the processed images is linked
    for name in ("run-1", "run-2"):
        for path in output_paths(dataset["sources"][name], out).values():
            if path.is_file():
                assert path.relative_to(out).as_posix() in page.links


def test_sections_volumes_flags_and_provenance(dataset):
    html = dataset["report"].read_text()
    sections = re.split(r"<h2 ", html)[1:]
    assert len(sections) == 3
    plain, doctored, failed = sections
    assert "No automatic QC flag fired" in plain
    table = pd.read_csv(
        output_paths(dataset["sources"]["run-1"], dataset["out"])["volumes"], sep="\t"
    )
    icv_ml = table.loc[table["index"] == 702, "volume_mm3"].item() / 1000
    assert f"<td class=num>{icv_ml:.1f}</td><td class=num>100.0</td>" in plain
    for _, label in KEY_VOLUMES:
        assert label in plain
    # the doctored scan: the flags fired, each explained in words
    assert "No automatic QC flag fired" not in doctored
    for flag in ("asymmetry", "missing-rois"):
        assert f"<b>{flag}</b>: " in doctored
        assert explain(flag).split(";")[0][:60].replace("'", "&#x27;") in doctored
    assert "This image failed" in failed and "crash-20260101-000000" in failed
    for field in ("dlmuse-bids 1.0", "cpu", "fp32", "mirroring", "DLICV 1.5 s", "ab" * 32):
        assert field in plain, field
    assert "Template check skipped: not run" in plain


def _copy(dataset, root: Path) -> dict:
    """The dataset fixture's raw and output trees copied under ``root`` (to change them)."""
    for name in ("raw", "out"):
        shutil.copytree(dataset[name], root / name, symlinks=True)
    sources = {
        k: root / "raw" / v.relative_to(dataset["raw"]) for k, v in dataset["sources"].items()
    }
    return {"raw": root / "raw", "out": root / "out", "sources": sources}


def test_figures_redraw_only_when_stale(dataset, tmp_path):
    copy = _copy(dataset, tmp_path)
    out, source = copy["out"], copy["sources"]["run-1"]
    figure = figure_paths(source, out)["mosaic"]
    stamp = figure.stat().st_mtime_ns
    write_subject_report("01", [source], out, copy["raw"])
    assert figure.stat().st_mtime_ns == stamp
    write_subject_report("01", [source], out, copy["raw"], redraw=True)
    assert figure.stat().st_mtime_ns > stamp


def test_label_colours_come_from_the_dseg_table():
    colours = label_colours()
    assert colours[0, 3] == 0.0, "background is transparent"
    assert (colours[[4, 47, 48], 3] == 1.0).all()


def test_subject_report_in_a_real_browser(dataset):
    from tests.support.browser import link_targets, render, require_chromium

    require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "subject_report.png"
    sources = list(dataset["sources"].values())
    page = write_subject_report("01", sources, dataset["out"], dataset["raw"])
    report = render(page, shot)
    assert report.title == "dlmuse-bids: sub-01"
    assert len(report.images) == 2
    assert all(i.complete and i.natural_width > 0 for i in report.images), report.images
    targets = link_targets(report, dataset["out"])
    assert targets.local and not targets.missing and not targets.outside
    assert not targets.external
    assert not report.console_errors and not report.failed_requests
    assert not report.external_requests
    assert shot.stat().st_size > 10_000


# ---- group report ----


def test_robust_z():
    values = pd.Series([10.0, 11.0, 9.0, 10.5, 9.5, 30.0])
    z = robust_z(values)
    assert abs(z.iloc[-1]) > ROBUST_Z_LIMIT
    assert (z.iloc[:-1].abs() < ROBUST_Z_LIMIT).all()
    assert (robust_z(pd.Series([5.0, 5.0, 5.0])) == 0).all()


@pytest.fixture(scope="module")
def group_dataset(dataset, tmp_path_factory):
    """The dataset fixture (copied) with a participants.tsv and its group level written."""
    copy = _copy(dataset, tmp_path_factory.mktemp("group-report"))
    raw, out = copy["raw"], copy["out"]
    (raw / "participants.tsv").write_text("participant_id\tage\nsub-01\t71\n")
    sources = sorted(copy["sources"].values())
    write_group_tables(sources, raw, out)
    copy["report"] = write_group_report(out)
    return copy


def test_group_report_lists_flagged_and_failed_images(group_dataset):
    out, group_report = group_dataset["out"], group_dataset["report"]
    assert group_report == out / "group" / "dlmuse_report.html"
    html = group_report.read_text()
    flagged = html.split("<h2>Flagged images</h2>")[1].split("<h2>")[0]
    assert "sub-01_run-2_T1w.nii.gz" in flagged and "QC: " in flagged
    assert "sub-01_run-1_T1w.nii.gz" not in flagged
    failed = html.split("<h2>Failed or missing images</h2>")[1].split("<h2>")[0]
    assert "sub-01_run-3_T1w.nii.gz" in failed and "failed" in failed
    assert f"{ROBUST_Z_LIMIT:g}" in html and "MAD" in html
    page = _parse(group_report)
    assert len(page.images) == 3, "key volumes, ICV vs TBV, volumes vs age"
    for href in page.images + page.links:
        target = href.split("#")[0]
        assert (group_report.parent / target).is_file(), href
    anchors = _parse(out / "sub-01.html").ids
    for href in page.links:
        if "#" in href:
            assert href.split("#")[1] in anchors, href


def test_group_report_in_a_real_browser(group_dataset):
    from tests.support.browser import link_targets, render, require_chromium

    group_report = group_dataset["report"]
    require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    report = render(group_report, ARTIFACTS / "group_report.png")
    assert report.title == "dlmuse-bids: group report"
    assert len(report.images) == 3
    assert all(i.complete and i.natural_width > 0 for i in report.images), report.images
    targets = link_targets(report, group_report.parents[1])
    assert targets.local and not targets.missing and not targets.outside and not targets.external
    assert not report.console_errors and not report.failed_requests
    assert not report.external_requests


# ---- normative centiles ----


@pytest.fixture(scope="module")
def centile_dataset(dataset, tmp_path_factory):
    """The dataset fixture (copied) with centiles for run-1 (age 71) and the doctored run-2
    (age 73) of a woman, and both levels' reports drawn with NiChart's tables."""
    from dlmuse_bids.bids import centile_paths
    from dlmuse_bids.demographics import Subject
    from dlmuse_bids.norms import load_norms
    from dlmuse_bids.runner.centiles import write_centiles
    from tests.support.paths import NICHART_NORMS

    if not NICHART_NORMS.is_dir():
        pytest.skip(f"NiChart's tables not found at {NICHART_NORMS}")
    norms = load_norms(NICHART_NORMS)
    copy = _copy(dataset, tmp_path_factory.mktemp("centile-report"))
    raw, out = copy["raw"], copy["out"]
    for name, age in (("run-1", 71.0), ("run-2", 73.0)):
        source = copy["sources"][name]
        volumes = pd.read_csv(output_paths(source, out)["volumes"], sep="\t")
        paths = centile_paths(source, out)
        assert write_centiles(volumes, Subject(age, "F"), norms, paths, name, print)
    sources = sorted(copy["sources"].values())
    copy["subject"] = write_subject_report("01", sources, out, raw)
    write_group_tables(sources, raw, out)
    copy["group"] = write_group_report(out, norms)
    return copy


def test_subject_report_gives_centiles_in_words(centile_dataset):
    html = centile_dataset["subject"].read_text()
    plain, doctored, failed = re.split(r"<h2 ", html)[1:]
    block = plain.split("<h3>Normative centiles</h3>")[1].split("<h3>")[0]
    assert block.count("<svg class=bar") == len(KEY_VOLUMES)
    assert "cognitively normal women aged 71" in block and "CN-Females" in block
    assert "cognitively normal people aged 71" in block  # the ICV: both sexes' curve
    # the doctored scan lost a hemisphere: its grey matter is below the 5th centile, flagged
    block = doctored.split("<h3>Normative centiles</h3>")[1].split("<h3>")[0]
    assert "<b>outside-norms</b>" in block and "Grey matter" in block.split("</p>")[0]
    assert "smaller than 95 % of cognitively normal women aged 73" in block
    assert "Normative centiles" not in failed
    links = _parse(centile_dataset["subject"]).links
    assert "sub-01/anat/sub-01_run-1_seg-DLMUSE_centiles.tsv" in links


def test_group_report_draws_the_centile_bands(centile_dataset):
    out, report = centile_dataset["out"], centile_dataset["group"]
    table = pd.read_csv(out / "group" / "dlmuse_centiles.tsv", sep="\t", dtype=str)
    assert table["age"].tolist()[:2] == ["71.0", "73.0"]
    page = _parse(report)
    # key volumes, ICV vs TBV and the bands (no participants.tsv: no volumes against age)
    assert len(page.images) == 3 and page.images[-1].endswith("dlmuse_centile_bands.png")
    assert "dlmuse_centiles.tsv" in report.read_text()


def test_centile_reports_in_a_real_browser(centile_dataset):
    from tests.support.browser import render, require_chromium

    require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    for key, count in (("subject", 2), ("group", 3)):
        shot = ARTIFACTS / f"{key}_report_centiles.png"
        report = render(centile_dataset[key], shot)
        assert len(report.images) == count
        assert all(i.complete and i.natural_width > 0 for i in report.images), report.images
        assert not report.console_errors and not report.failed_requests
        assert shot.stat().st_size > 10_000
