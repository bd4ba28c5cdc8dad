"""dlmuse_bids.norms: centiles by hand on small tables, NiChart's own rule on the real ones."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dlmuse_bids import labels
from dlmuse_bids.norms import (
    AGE_FLAG,
    CENTILE_COLUMNS,
    CENTILES,
    NICHART_FILES,
    NOT_ROIS,
    REFERENCE_ICV_MM3,
    TABLE_FILES,
    NormsError,
    RoiNames,
    find_norms,
    image_centiles,
    load_norms,
    place,
)
from tests.support.norms import ROIS, centiles_at, make_norms
from tests.support.paths import NICHART_NORMS

needs_nichart = pytest.mark.skipif(
    not NICHART_NORMS.is_dir(), reason=f"NiChart's tables not found at {NICHART_NORMS}"
)


def _volumes(**by_id: float) -> pd.DataFrame:
    """A volumes table from keyword arguments ``id<MUSE id>=mm3``."""
    names = labels.load_label_table().set_index("index")["name"]
    ids = [int(key.removeprefix("id")) for key in by_id]
    return pd.DataFrame(
        {"index": ids, "name": [names[i] for i in ids], "volume_mm3": list(by_id.values())}
    )


@pytest.fixture
def norms(tmp_path):
    return load_norms(make_norms(tmp_path / "norms"))


def test_place_by_hand():
    cols = [80.0, 90.0, 100.0, 110.0, 120.0]
    assert place(95.0, cols) == (37.5, None)  # halfway between the 25th and the 50th
    assert place(100.0, cols) == (50.0, None)  # on a column
    assert place(80.0, cols) == (5.0, None) and place(120.0, cols) == (95.0, None)
    assert place(114.0, cols) == (pytest.approx(83.0), None)
    assert place(76.0, cols) == (None, pytest.approx(-0.1))  # 4 below c5, spread 40
    assert place(130.0, cols) == (None, pytest.approx(0.25))
    assert place(3.0, [1.0, 2.0, 2.0, 2.0, 4.0]) == (pytest.approx(85.0), None)
    assert place(float("nan"), cols) == (None, None)


def test_centiles_of_one_image_by_hand(norms):
    hippo, brain = ROIS["Hippocampus_L"][1], ROIS["TotalBrain"][1]
    # age 45.5: halfway between the rows of 45 and 46, median x (1 - 0.055)
    median = hippo * (1 - 0.055)
    volumes = _volumes(id48=median * 0.95, id701=brain * 2, id702=1_430_000.0)
    frame, flags = image_centiles(volumes, 45.5, None, norms)
    assert flags == []
    rows = frame.set_index("index")
    assert list(frame.columns)[:5] == ["index", "name", "volume_mm3", "reference", "centile"]
    assert rows.at[48, "reference"] == "CN"
    assert float(rows.at[48, "centile"]) == pytest.approx(37.5)
    assert rows.at[48, "centile_beyond"] == "n/a"
    assert rows.at[701, "centile"] == ">95"
    c = centiles_at(brain, 45)
    c46 = centiles_at(brain, 46)
    c95, c5 = (c[4] + c46[4]) / 2, (c[0] + c46[0]) / 2
    assert float(rows.at[701, "centile_beyond"]) == pytest.approx(
        (brain * 2 - c95) / (c95 - c5), abs=1e-3
    )
    # ICV 1,430,000: the ICV-normalised volume equals the raw one
    assert rows.at[48, "icvnorm_centile"] == rows.at[48, "centile"]
    # the ICV's own centile: CN-ICVNorm's unscaled curve (median 1.4e6 at 40), no normalised one
    assert rows.at[702, "reference"] == "CN-ICVNorm" and rows.at[702, "icvnorm_centile"] == "n/a"


def test_sex_picks_the_table_and_icv_scales(norms):
    hippo = ROIS["Hippocampus_L"][1]
    volumes = _volumes(id48=hippo * 1.05, id702=REFERENCE_ICV_MM3 / 2)
    male = image_centiles(volumes, 40, "M", norms)[0].set_index("index")
    female = image_centiles(volumes, 40, "F", norms)[0].set_index("index")
    assert male.at[48, "reference"] == "CN-Males" and female.at[48, "reference"] == "CN-Females"
    assert float(male.at[48, "centile"]) == pytest.approx(50.0)  # the male median is 1.05 x
    assert female.at[48, "centile"] != male.at[48, "centile"]
    # half the reference ICV: the normalised volume is doubled, far above the 95th
    assert male.at[48, "icvnorm_centile"] == ">95"
    assert float(male.at[48, "icvnorm_centile_beyond"]) == pytest.approx((2.1 - 1.2) / 0.4)


def test_age_outside_the_table_uses_its_edge_and_is_flagged(norms):
    hippo = ROIS["Hippocampus_L"][1]
    volumes = _volumes(id48=hippo * 0.9, id702=REFERENCE_ICV_MM3)
    young, flags = image_centiles(volumes, 25, None, norms)
    assert flags == [AGE_FLAG]
    assert float(young.set_index("index").at[48, "centile"]) == pytest.approx(25.0)  # as at 40
    old, flags = image_centiles(volumes, 99.0, None, norms)
    at_edge, none = image_centiles(volumes, 50.0, None, norms)
    assert flags == [AGE_FLAG] and none == []
    assert old["centile"].tolist() == at_edge["centile"].tolist()


def test_malformed_tables_are_refused_naming_the_file(tmp_path):
    folder = make_norms(tmp_path / "n")
    cn = folder / TABLE_FILES["CN"]
    good = cn.read_text()
    frame = pd.read_csv(cn)
    frame.loc[0, "centile_25"] = frame.loc[0, "centile_95"] * 2
    frame.to_csv(cn, index=False)
    with pytest.raises(NormsError, match=f"{cn}: Hippocampus_L's centiles decrease"):
        load_norms(folder)
    cn.write_text(good + good.splitlines()[1] + "\n")  # a row given twice, alike: fine
    load_norms(folder)
    frame = pd.read_csv(cn)
    frame = pd.concat([frame, frame.iloc[:1].assign(centile_50=frame.loc[0, "centile_50"] + 1)])
    frame.to_csv(cn, index=False)
    with pytest.raises(NormsError, match="two different rows for age 40"):
        load_norms(folder)
    cn.write_text("VarName,Age\nHippocampus_L,40\n")
    with pytest.raises(NormsError, match="lacks the column"):
        load_norms(folder)
    cn.write_bytes(b"\x00\xff\x00 not a csv")
    with pytest.raises(NormsError, match=str(cn)):
        load_norms(folder)
    cn.unlink()
    with pytest.raises(NormsError, match=f"{cn}: missing"):
        load_norms(folder)
    assert find_norms([tmp_path / "elsewhere", folder]) is None
    cn.write_text(good)
    assert find_norms([tmp_path / "elsewhere", folder]) == folder


def _nichart_centile(table: pd.DataFrame, name: str, age: float, value: float) -> float:
    """NiChart's viewer rule: the row of the nearest whole age, linear between columns;
    defined only inside the 5-95 range."""
    row = table[(table["VarName"] == name) & (table["Age"] == round(age))].iloc[0]
    cols = [float(row[c]) for c in CENTILE_COLUMNS]
    assert cols[0] <= value <= cols[-1]
    return float(np.interp(value, cols, CENTILES))


@needs_nichart
def test_real_tables_cover_the_muse_rois_and_reproduce_nichart():
    norms = load_norms(NICHART_NORMS)
    assert norms.pinned and norms.sha256 == {n: pin[2] for n, pin in NICHART_FILES.items()}
    ours = set(labels.volume_roi_ids())
    for reference, curves in norms.curves.items():
        missing = ours - set(curves)
        assert missing == ({600} if reference == "CN-ICVNorm" else {600, 702}), reference
    names = RoiNames(pd.read_csv(NICHART_NORMS / "list_MUSE_all.csv"))
    for file_name in TABLE_FILES.values():
        table_names = set(pd.read_csv(NICHART_NORMS / file_name, usecols=["VarName"])["VarName"])
        assert {n for n in table_names if not names.ids(n)} <= NOT_ROIS, file_name
    assert norms.age_range("CN") == (40, 93) and norms.age_range("CN-Males") == (40, 92)
    cn = pd.read_csv(NICHART_NORMS / TABLE_FILES["CN-Females"])
    ids = {"Hippocampus_L": 48, "GM": 601, "Ventricles": 509, "Frontal_WM_L": 82}
    rng = np.random.default_rng(0)
    for name, roi in ids.items():
        for age in (40, 57, 71.0, 93):
            row = cn[(cn["VarName"] == name) & (cn["Age"] == age)].iloc[0]
            value = float(rng.uniform(row["centile_5"], row["centile_95"]))
            frame, _ = image_centiles(
                _volumes(**{f"id{roi}": value, "id702": 1.5e6}), age, "F", norms
            )
            ours_c = float(frame.set_index("index").at[roi, "centile"])
            assert ours_c == pytest.approx(_nichart_centile(cn, name, age, value), abs=0.005)
    # between whole ages NiChart jumps to the nearest row; ours lies between the two
    row60 = cn[(cn["VarName"] == "GM") & (cn["Age"] == 60)].iloc[0]
    value = float(row60["centile_50"])
    at = {
        a: float(
            image_centiles(_volumes(id601=value, id702=1.5e6), a, "F", norms)[0]["centile"][0]
        )
        for a in (60, 60.5, 61)
    }
    assert at[60] == pytest.approx(50.0) and min(at[60], at[61]) < at[60.5] < max(at[60], at[61])
    assert not math.isclose(at[60.5], at[60])
