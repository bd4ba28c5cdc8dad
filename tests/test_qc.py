"""dlmuse_bids.qc: each rule on real DLMUSE label maps (clean) and doctored copies (flagged)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dlmuse_bids import qc
from dlmuse_bids.labels import load_label_table
from tests.support.paths import DATA_DIR

MAPS = ["IXI002-Guys-0828_dseg-DLMUSE.nii.gz", "nichart-Subj1_dseg-DLMUSE_2mm.nii.gz"]
pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "dlmuse_labels").is_dir(), reason=f"no real label maps under {DATA_DIR}"
)


def _load(name):
    img = nib.load(DATA_DIR / "dlmuse_labels" / name)
    return np.asarray(img.dataobj).copy(), tuple(float(z) for z in img.header.get_zooms()[:3]), img


@pytest.mark.parametrize("name", MAPS)
def test_real_label_maps_pass_clean(name):
    labels, zooms, _ = _load(name)
    row = qc.qc_row(labels, zooms, component_outcome="single", orientation="RAS")
    assert row["qc_flags"] == ""
    assert 1.1 < row["icv_l"] < 1.9
    assert 0.65 < row["brain_icv_ratio"] < 0.95
    assert row["n_missing_rois"] == 0


@pytest.mark.parametrize("name", MAPS)
def test_erased_hemisphere_is_flagged(name):
    labels, zooms, _ = _load(name)
    table = load_label_table()
    left = table.loc[table["name"].str.contains(r"(?:^|_)left(?:_|$)"), "index"].to_numpy()
    labels[np.isin(labels, left)] = 0  # every left-hemisphere region gone
    flags = qc.flags(qc.measures(labels, zooms, component_outcome="single"))
    assert "asymmetry" in flags and "missing-rois" in flags


@pytest.mark.parametrize("name", MAPS)
def test_halved_icv_is_flagged(name):
    labels, zooms, _ = _load(name)
    smaller = tuple(z * 0.5 ** (1 / 3) for z in zooms)  # a header with the wrong voxel size
    row = qc.qc_row(labels, smaller, component_outcome="single")
    assert row["qc_flags"].split() == ["icv-out-of-range"]


@pytest.mark.parametrize("name", MAPS)
def test_removed_label_is_flagged(name):
    labels, zooms, _ = _load(name)
    hippocampus = int(load_label_table().set_index("name").at["left_hippocampus", "index"])
    labels[labels == hippocampus] = 0
    row = qc.qc_row(labels, zooms, component_outcome="single")
    assert "missing-rois" in row["qc_flags"].split()
    assert row["missing_rois"] == str(hippocampus)


def test_component_unlabelled_icv_and_voxel_rules():
    labels, zooms, _ = _load(MAPS[0])
    assert qc.flags(qc.measures(labels, zooms, component_outcome="no-large-component")) == [
        "icv-component-rule"
    ]
    assert "coarse-voxels" in qc.flags(qc.measures(labels, (2.5, 1.0, 1.0)))
    brain = (labels > 1) & np.isin(labels, [i for i in np.unique(labels) if i not in (0, 1)])
    relabelled = labels.copy()
    relabelled[brain & (np.random.default_rng(0).random(labels.shape) < 0.5)] = 1
    flags = qc.flags(qc.measures(relabelled, zooms, component_outcome="single"))
    assert "much-unlabelled-icv" in flags and "brain-icv-ratio" in flags


def test_every_flag_is_explained():
    for rule in qc.RULES:
        assert len(qc.explain(rule.flag)) > 40
    with pytest.raises(KeyError):
        qc.explain("no-such-flag")


def test_template_rules():
    row = {"template_rotation_deg": 29.0, "icv_etiv_ratio": 1.14, "template_ncc": 0.6}
    assert qc.flags(row) == []
    row = {"template_rotation_deg": 31.0, "icv_etiv_ratio": 0.8, "template_ncc": 0.3}
    assert qc.flags(row) == ["template-rotation", "etiv-mismatch", "template-misfit"]
    skipped = qc.template_columns({"skipped": "no template"}, 1.4)
    assert skipped["template_check"] == "skipped: no template"
    assert qc.flags(skipped) == []
