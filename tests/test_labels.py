"""Tests for :mod:`dlmuse_bids.labels`: the MUSE table, ROI volumes and NiChart's CSV layout."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids import labels

SHARED = Path(__file__).resolve().parents[2] / "shared"
MUSE_REF = SHARED / "reference" / "muse"
LABEL_DIR = SHARED / "data" / "dlmuse_labels"
NICHART_CSV = MUSE_REF / "nichart_demo_DLMUSE_Volumes.csv"

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent"
)
LABEL_MAPS = sorted(LABEL_DIR.glob("*_dseg-DLMUSE*.nii.gz")) if LABEL_DIR.is_dir() else []
OPTIC_CHIASM = 69  # predicted by DLMUSE but a member of no derived ROI, not even ICV


def _col(roi: int) -> str:
    return f"{labels.NICHART_PREFIX}{roi}"


# --- the table ---------------------------------------------------------------------------------


def test_table_kinds_and_columns() -> None:
    table = labels.load_label_table()
    for column in ("index", "name", "full_name", "kind", "nnunet_class", "members", "color"):
        assert column in table.columns
    assert table["index"].is_unique
    assert set(table["kind"]) == {"background", "single", "derived"}
    background = table[table["kind"] == "background"]
    assert background["index"].tolist() == [0]
    assert table.loc[table["kind"] == "single", "name"].is_unique
    # the cache hands out copies
    table.loc[:, "name"] = "x"
    assert labels.load_label_table()["name"].iloc[1] != "x"


def test_nnunet_classes_map_to_distinct_muse_ids() -> None:
    lut = labels.class_to_muse_lut()
    assert lut.dtype == np.uint8
    assert lut.shape == (labels.N_NNUNET_CLASSES,)
    assert lut[0] == 0
    assert len(set(lut[1:].tolist())) == 151
    assert 0 not in lut[1:]
    singles = set(labels.single_roi_ids())
    assert set(lut[1:].tolist()) == singles - {labels.RESIDUAL_ICV_LABEL}


def test_single_and_volume_ids() -> None:
    singles = labels.single_roi_ids()
    assert singles == sorted(singles)
    assert len(singles) == 152 and singles[0] == labels.RESIDUAL_ICV_LABEL
    volume_ids = labels.volume_roi_ids()
    assert len(volume_ids) == 260 == len(set(volume_ids))
    assert volume_ids[:5] == [702, 701, 600, 601, 604]
    for roi in (labels.ICV_ID, labels.TOTALBRAIN_ID, labels.GM_ID, labels.WM_ID):
        assert roi in volume_ids


def test_derived_members_are_singles() -> None:
    table = labels.load_label_table()
    singles = set(labels.single_roi_ids())
    derived = table[table["kind"] == "derived"]
    assert len(derived) == 115
    for roi, members in zip(derived["index"], derived["members"], strict=True):
        ids = [int(m) for m in members.split()]
        assert ids and set(ids) <= singles, roi
    members = labels.volume_roi_members()
    assert members[600] == (labels.RESIDUAL_ICV_LABEL,)
    # ICV = TOTALBRAIN + label 1 + csf (46)
    assert set(members[702]) == set(members[701]) | {labels.RESIDUAL_ICV_LABEL, 46}


def test_colours_distinct() -> None:
    table = labels.load_label_table()
    colors = table.loc[table["kind"] != "derived", "color"].tolist()
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
    assert len(set(colors)) == len(colors) == 153


# --- volumes on tiny synthetic maps ------------------------------------------------------------


def test_voxel_volume() -> None:
    zooms = (np.float32(0.9375), np.float32(0.9375), np.float32(1.2), np.float32(2.0))
    assert labels.voxel_volume_mm3(zooms) == pytest.approx(0.9375 * 0.9375 * 1.2, rel=1e-7)
    assert isinstance(labels.voxel_volume_mm3((1, 1, 1)), float)
    with pytest.raises(ValueError):
        labels.voxel_volume_mm3((1.0, 1.0))


def test_synthetic_volumes() -> None:
    data = np.zeros((4, 4, 4), dtype=np.uint8)
    data[0, :, :] = 1  # 16 voxels of residual ICV
    data[1, :2, :] = 47  # 8 voxels right hippocampus
    data[2, 0, 0] = 95  # 1 voxel corpus callosum
    data[3, 0, 0] = OPTIC_CHIASM
    single = labels.roi_volumes(data, (2.0, 1.0, 1.0))[0]
    assert list(single) == labels.single_roi_ids()
    assert single[1] == 32.0 and single[47] == 16.0 and single[95] == 2.0
    assert single[48] == 0.0
    volumes = labels.derived_roi_volumes(single)
    assert list(volumes) == labels.volume_roi_ids()
    assert volumes[600] == 32.0
    assert volumes[702] == 50.0  # everything but the optic chiasm
    assert volumes[701] == 18.0
    assert volumes[501] == 2.0  # CORPUS_CALLOSUM
    # float maps (get_fdata) give the same answer
    assert labels.roi_volumes(data.astype(np.float64), (2.0, 1.0, 1.0))[0] == single


@pytest.mark.parametrize("bad", [3, 250, -5])
def test_unknown_label_raises(bad: int) -> None:
    data = np.zeros((3, 3, 3), dtype=np.int16)
    data[1, 1, 1] = bad
    data[0, 0, 0] = 4
    with pytest.raises(ValueError, match=rf"unknown label values: {bad}\b"):
        labels.roi_volumes(data, (1.0, 1.0, 1.0))[0]


def test_non_integer_float_map_raises() -> None:
    with pytest.raises(ValueError, match="non-integer"):
        labels.roi_volumes(np.full((2, 2, 2), 4.5), (1.0, 1.0, 1.0))


def test_derived_requires_members() -> None:
    single = dict.fromkeys(labels.single_roi_ids(), 1.0)
    del single[47]
    with pytest.raises(ValueError, match="47"):
        labels.derived_roi_volumes(single)


def test_write_nichart_csv_roundtrip(tmp_path: Path) -> None:
    single = {roi: float(i) * 1.1 for i, roi in enumerate(labels.single_roi_ids())}
    volumes = labels.derived_roi_volumes(single)
    rows = [labels.nichart_volumes_row("sub-a", volumes), labels.nichart_volumes_row("b", volumes)]
    out = tmp_path / "DLMUSE_Volumes.csv"
    labels.write_nichart_csv(rows, out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left
    with out.open(newline="") as fobj:
        header = next(csv.reader(fobj))
    assert header == labels.nichart_columns()
    if NICHART_CSV.is_file():
        assert header == pd.read_csv(NICHART_CSV, nrows=0).columns.tolist()
    back = pd.read_csv(out, dtype={"MRID": str})
    assert back["MRID"].tolist() == ["sub-a", "b"]
    for roi, value in volumes.items():
        assert back.loc[0, _col(roi)] == value  # shortest-repr floats round-trip exactly
    with pytest.raises(ValueError, match="missing"):
        labels.write_nichart_csv([{"MRID": "x"}], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


# --- real DLMUSE label maps --------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("path", LABEL_MAPS, ids=lambda p: p.name)
def test_real_label_map_volumes(path: Path) -> None:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    vox = float(np.prod(np.asarray(img.header.get_zooms()[:3], dtype=np.float64)))
    single = labels.roi_volumes(data, img.header.get_zooms())[0]

    values, counts = np.unique(data, return_counts=True)
    expected = dict(zip(values.tolist(), counts.tolist(), strict=True))
    for roi, volume in single.items():
        assert volume == pytest.approx(expected.get(roi, 0) * vox, rel=1e-12), roi
    assert set(expected) - {0} <= set(single)

    volumes = labels.derived_roi_volumes(single)
    for roi, members in labels.volume_roi_members().items():
        assert volumes[roi] == pytest.approx(sum(single[m] for m in members), rel=1e-12), roi
    # ICV covers every labelled voxel except the optic chiasm, which no derived ROI includes
    nonzero = int(np.count_nonzero(data))
    chiasm = int(np.count_nonzero(data == OPTIC_CHIASM))
    assert volumes[labels.ICV_ID] == pytest.approx((nonzero - chiasm) * vox, rel=1e-12)
    assert volumes[600] == pytest.approx(expected[labels.RESIDUAL_ICV_LABEL] * vox, rel=1e-12)


@pytest.mark.skipif(not LABEL_MAPS, reason="no DLMUSE label maps in ../shared/data")
@needs_shared
def test_matches_nichart_calcroivol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # CalcROIVol opens pipeline.log in the cwd on import
    calc = pytest.importorskip("NiChart_DLMUSE.CalcROIVol")
    path = LABEL_MAPS[0]
    out_csv = tmp_path / "ref.csv"
    calc.create_roi_csv(
        "ref",
        str(path),
        str(MUSE_REF / "MUSE_mapping_consecutive_indices.csv"),
        str(MUSE_REF / "MUSE_mapping_derived_rois.csv"),
        str(out_csv),
    )
    ref = pd.read_csv(out_csv).iloc[0]
    img = nib.load(path)
    single, ours = labels.roi_volumes(np.asanyarray(img.dataobj), img.header.get_zooms())
    assert [int(c) for c in ref.index[1:]] == labels.volume_roi_ids()
    for roi, volume in ours.items():
        # NiChart multiplies by the float32 product of the zooms
        assert volume == pytest.approx(ref[str(roi)], rel=1e-6, abs=1e-9), roi


# --- NiChart's own volumes table ---------------------------------------------------------------


@needs_shared
def test_nichart_csv_column_order() -> None:
    header = pd.read_csv(NICHART_CSV, nrows=0).columns.tolist()
    assert header[0] == "MRID"
    assert [int(c.removeprefix(labels.NICHART_PREFIX)) for c in header[1:]] == (
        labels.volume_roi_ids()
    )
    assert header == labels.nichart_columns()


@needs_shared
def test_nichart_csv_derived_are_sums_of_members() -> None:
    table = pd.read_csv(NICHART_CSV)
    assert len(table) > 0
    members = labels.volume_roi_members()
    # label 1 appears only as ROI 600; csf (46) is an ICV member without a column of its own
    column_of = {roi: _col(roi) for roi in members}
    column_of[labels.RESIDUAL_ICV_LABEL] = _col(600)
    for roi, ids in members.items():
        if ids == (roi,):
            continue
        reported = [m for m in ids if m in column_of]
        total = table[[column_of[m] for m in reported]].sum(axis=1)
        if roi == labels.ICV_ID:
            assert reported == [m for m in ids if m != 46]
            residual = table[_col(roi)] - total  # the unreported csf (46) volume
            assert (residual > 0).all() and (residual < 0.01 * table[_col(roi)]).all()
            continue
        assert reported == list(ids), roi
        np.testing.assert_allclose(table[_col(roi)], total, rtol=1e-6, err_msg=str(roi))


def test_roi_volume_table() -> None:
    rng = np.random.default_rng(3)
    ids = labels.single_roi_ids()
    label_map = rng.choice([0, *ids[:40]], size=(30, 20, 10)).astype(np.uint8)
    table = labels.roi_volume_table(label_map, (1.0, 2.0, 0.5))
    singles = table[table["n_voxels"].notna()]
    derived = table[table["n_voxels"].isna()]
    assert singles["index"].tolist() == ids
    for row in singles.itertuples():
        assert row.n_voxels == int(np.count_nonzero(label_map == row.index))
        assert row.volume_mm3 == row.n_voxels * 1.0
    members = labels.volume_roi_members()
    by_id = dict(zip(table["index"], table["volume_mm3"], strict=True))
    for roi, vol in zip(derived["index"], derived["volume_mm3"], strict=True):
        assert vol == pytest.approx(sum(by_id[m] for m in members[roi]))
    assert set(table["index"]) >= set(labels.volume_roi_ids())
    assert table["index"].is_unique and table["name"].is_unique


def test_dseg_table() -> None:
    table = labels.dseg_table()
    assert table["index"].tolist() == [0, *labels.single_roi_ids()]
    assert table.loc[table["index"] == 1, "abbreviation"].item() == "cortical_csf"
    assert table["abbreviation"].is_unique
