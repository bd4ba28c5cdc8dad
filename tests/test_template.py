"""The template check: orientation errors in the header are found, a plain scan is not flagged."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest

from dlmuse_bids import bids, qc, template
from tests.conftest import needs_shared
from tests.support.templates import COLIN, head_mask, make_templateflow_home


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    i, j = (k for k in range(3) if k != axis)
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = (
        math.cos(a),
        -math.sin(a),
        math.sin(a),
        math.cos(a),
    )
    return rot


def test_the_bids_name_uses_the_template_of_the_check():
    assert bids.TEMPLATE_NAME == template.TEMPLATE
    assert bids.OUTPUTS["xfm"]["to"] == template.TEMPLATE


def test_find_template(tmp_path):
    files, why = template.find_template(None)
    assert files is None and "TEMPLATEFLOW_HOME" in why
    files, why = template.find_template(tmp_path)
    assert files is None and "not found" in why
    folder = tmp_path / f"tpl-{template.TEMPLATE}"
    folder.mkdir()
    t1w = folder / f"tpl-{template.TEMPLATE}_res-02_T1w.nii.gz"
    mask = folder / f"tpl-{template.TEMPLATE}_res-02_desc-brain_mask.nii.gz"
    t1w.touch()  # TemplateFlow's placeholder for a file it has not downloaded
    mask.write_bytes(b"x")
    files, why = template.find_template(tmp_path)
    assert files is None and "placeholder" in why and str(t1w) in why
    t1w.write_bytes(b"x")
    files, why = template.find_template(tmp_path)
    assert files == template.TemplateFiles(template.TEMPLATE, t1w, mask) and why == ""


@needs_shared
def test_fetch_template_keeps_files_already_there(tmp_path):
    """TemplateFlow (in a child process) finds the files present and downloads nothing."""
    home = make_templateflow_home(tmp_path / "tf")
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*.nii.gz")}
    files = template.fetch_template(home, os.environ)
    assert files.t1w in before and files.mask in before
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_axis_rotations_are_the_24_proper_ones():
    rots = template.axis_rotations()
    assert rots.shape == (24, 3, 3)
    assert np.array_equal(rots[0], np.eye(3))
    assert np.allclose([np.linalg.det(r) for r in rots], 1.0)
    assert len({r.tobytes() for r in rots}) == 24


@pytest.mark.parametrize(("axis", "degrees"), [(0, 0.0), (0, 20.0), (1, 90.0), (2, 45.0)])
def test_rotation_angle(axis, degrees):
    linear = _rotation(axis, degrees)[:3, :3] @ np.diag([1.1, 0.9, 1.2])
    assert template.rotation_angle_deg(linear) == pytest.approx(degrees, abs=1e-6)


def test_itk_text_round_trip_and_convention():
    matrix = _rotation(2, 30.0)
    matrix[:3, 3] = [5.0, -7.0, 11.0]
    text = template.itk_affine_text(matrix)
    assert text.startswith("#Insight Transform File V1.0")
    assert "Transform: AffineTransform_double_3_3" in text
    assert np.allclose(template.read_itk_affine(text), matrix)
    # ITK works in LPS: x and y translations change sign, z does not
    params = [float(v) for v in text.split("Parameters: ")[1].split("\n")[0].split()]
    assert params[9:] == pytest.approx([-5.0, 7.0, 11.0])
    with pytest.raises(ValueError, match="affine"):
        template.read_itk_affine("Transform: BSplineTransform_double_3_3\nParameters: 0\n")


@pytest.fixture(scope="module")
def colin_template(tmp_path_factory):
    if not COLIN.is_file():
        pytest.skip(f"{COLIN} not found (CI has ../shared beside the repo)")
    home = make_templateflow_home(tmp_path_factory.mktemp("templateflow"))
    files, why = template.find_template(home)
    assert files is not None, why
    return nib.load(files.t1w), nib.load(files.mask)


@pytest.fixture(scope="module")
def colin():
    img = nib.load(COLIN)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data, head_mask(data), img.affine


def _check(colin, colin_template, header: np.ndarray):
    data, mask, affine = colin
    moved = header @ affine
    fit = template.register_to_template(
        nib.Nifti1Image(data, moved), nib.Nifti1Image(mask, moved), *colin_template
    )
    measures = qc.template_measures(
        template.TEMPLATE, fit.rotation_deg, fit.scale, fit.ncc, fit.etiv_l
    )
    icv_l = float(mask.sum()) / 1e6  # 1 mm voxels: the "ICV" of this test is the head mask
    row = qc.template_columns(measures, icv_l)
    return fit, row, qc.flags(row)


@needs_shared
def test_a_plain_scan_passes_the_template_check(colin, colin_template):
    fit, row, flags = _check(colin, colin_template, np.eye(4))
    assert flags == []
    assert fit.rotation_deg < 3.0
    assert fit.ncc > 0.95
    assert row["icv_etiv_ratio"] == pytest.approx(1.0, abs=0.06)
    # the scan is the template: the transform is nearly the identity
    assert np.allclose(fit.matrix[:3, :3], np.eye(3), atol=0.06)
    assert np.abs(fit.matrix[:3, 3]).max() < 3.0


@needs_shared
@pytest.mark.parametrize("name", ["rot90-x", "rot90-y", "rot90-z", "flip-front-back"])
def test_a_wrong_header_is_flagged(colin, colin_template, name):
    header = {
        "rot90-x": _rotation(0, 90.0),
        "rot90-y": _rotation(1, 90.0),
        "rot90-z": _rotation(2, 90.0),
        "flip-front-back": np.diag([1.0, -1.0, 1.0, 1.0]),
    }[name]
    fit, row, flags = _check(colin, colin_template, header)
    assert "template-rotation" in flags, (name, fit.rotation_deg)
    expected = 180.0 if name.startswith("flip") else 90.0
    assert fit.rotation_deg == pytest.approx(expected, abs=5.0)
    # the alignment still found the head, so the other measures stay meaningful
    assert fit.ncc > 0.9
    assert "etiv-mismatch" not in flags


@needs_shared
def test_the_transform_maps_template_points_onto_the_scan(colin, colin_template):
    """With a header rotated by 90 degrees, the fitted affine is that rotation (ITK direction)."""
    header = _rotation(2, 90.0)
    fit, _, _ = _check(colin, colin_template, header)
    assert np.allclose(fit.matrix[:3, :3], header[:3, :3], atol=0.06)


def test_an_empty_mask_is_refused():
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    empty = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="empty"):
        template.register_to_template(
            img, empty, img, nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4))
        )
