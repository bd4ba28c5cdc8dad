"""The one-image pipeline: NiChart's mask/crop/component rules, orientation, outputs, volumes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dlmuse_bids import pipeline
from dlmuse_bids.io import load_t1w
from dlmuse_bids.labels import class_to_muse_lut, single_roi_ids, volume_roi_members
from dlmuse_bids.models import find_model, load_trained_model
from dlmuse_bids.pipeline import (
    MIN_ICV_COMPONENT_VOXELS,
    STEPS,
    DLMUSEPipeline,
    crop_box,
    from_reference_orientation,
    itk_roundness,
    select_icv_component,
    step_sources,
    to_reference_orientation,
)
from dlmuse_bids.settings import InferenceOptions
from tests.conftest import synthetic_head


def _blob(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)) <= 1


def _nichart_mask_module():
    """NiChart's MaskImage.py, loaded without its package (whose import reconfigures logging
    and creates pipeline.log in the working directory)."""
    spec = importlib.util.find_spec("NiChart_DLMUSE")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("NiChart_DLMUSE (the reference pipeline) not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "MaskImage.py"
    module_spec = importlib.util.spec_from_file_location("nichart_maskimage", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_crop_box_matches_nichart_except_the_last_slice():
    mask_image = _nichart_mask_module()
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = ndimage.gaussian_filter(rng.random((50, 60, 40)), 2) > 0.52
        ours = crop_box(mask)
        ref = mask_image.calc_bbox_with_padding(mask)
        for axis, ((a, b), (ra, rb)) in enumerate(zip(ours, ref, strict=True)):
            assert a == ra
            # NiChart slices [b_min:b_max] with an inclusive b_max: it drops one slice unless
            # the box already reached the image edge. We keep it.
            assert b == (rb if rb == mask.shape[axis] else rb + 1)


def test_nichart_masking_requantises_integer_images(tmp_path):
    """NiChart's mask step writes float64 data with the uint8 header: nibabel rescales it, so
    DLMUSE sees intensities off by up to half a new quantisation step. We mask exactly."""
    mask_image = _nichart_mask_module()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (40, 40, 40)).astype(np.uint8)
    mask = np.zeros(data.shape, np.uint8)
    mask[8:30, 6:33, 10:31] = 1
    data[mask > 0] = np.minimum(data[mask > 0], 180)  # brighter voxels only outside the mask
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    mask_image.mask_img(
        str(tmp_path / "t1.nii.gz"),
        str(tmp_path / "mask.nii.gz"),
        str(tmp_path / "nichart.nii.gz"),
    )
    box = crop_box(mask)
    nichart_box = tuple(slice(a, b - 1) for a, b in box)  # NiChart's crop is one slice short
    theirs = nib.load(tmp_path / "nichart.nii.gz").get_fdata()
    exact = np.where(mask > 0, data, 0).astype(float)[nichart_box]
    assert theirs.shape == exact.shape
    assert np.abs(theirs - exact).max() > 0.1  # NiChart's DLMUSE input is not the scan's
    ours = np.where(mask > 0, data.astype(np.float32), 0)[tuple(slice(a, b) for a, b in box)]
    np.testing.assert_array_equal(ours[tuple(slice(0, s) for s in exact.shape)], exact)


def test_crop_box_keeps_a_thin_mask_whole():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:7, 3:15, 4:16] = True  # 2 slices thick: the padding rounds to 0
    box = crop_box(mask)
    assert box[0] == (5, 7)
    assert mask[tuple(slice(a, b) for a, b in box)].sum() == mask.sum()


def _reference_selection(mask, spacing):
    sitk = pytest.importorskip("SimpleITK")
    dlicv_utils = pytest.importorskip("DLICV.utils")
    image = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing(spacing)
    kept, _ = dlicv_utils.analyze_connected_components_for_icv(image)
    return None if kept is None else sitk.GetArrayFromImage(kept).transpose(2, 1, 0)


@pytest.mark.parametrize(
    "case", ["one", "two_round_wins", "two_big_elongated", "none", "many", "twins"]
)
def test_icv_component_choice_matches_dlicv(case, capsys):
    shape = (150, 150, 130)
    spacing = (1.0, 1.0, 1.2)
    mask = np.zeros(shape, bool)
    if case in ("one", "two_round_wins", "two_big_elongated", "many"):
        mask |= _blob(shape, (80, 70, 62), (42, 42, 42))  # round, ~310k voxels
    if case == "two_round_wins":
        mask[5:30, 5:145, 110:128] = True  # a flat slab, 63k: too small to count
        mask |= _blob(shape, (75, 140, 60), (14, 8, 60))  # elongated, small: not a candidate
        mask[128:150, 0:150, 0:70] = True  # a separate large box (231k): less round
    if case == "two_big_elongated":
        mask[0:22, :, :] = True  # a slab of 429k voxels: bigger than the head but not round
    if case == "none":
        mask |= _blob(shape, (75, 75, 65), (30, 30, 30))  # 113k only
    if case == "twins":  # two candidates of exactly the same size: SD 0, DLICV keeps all
        mask[0:20, 0:100, 0:110] = True
        mask[130:150, 0:100, 0:110] = True
    if case == "many":
        for i in range(4):
            mask[i * 35 + 2 : i * 35 + 30, 130:150, 100:130] = True  # small pieces
    ours, info = select_icv_component(mask.astype(np.uint8), spacing)
    ref = _reference_selection(mask, spacing)
    capsys.readouterr()  # DLICV prints its analysis
    if ref is None:
        assert info.outcome in ("no-large-component", "no-component-within-3sd")
        np.testing.assert_array_equal(ours, mask.astype(np.uint8))
    else:
        np.testing.assert_array_equal(ours, ref)
    assert info.kept_voxels == int(ours.sum())
    if case == "two_round_wins":
        assert info.outcome == "largest-roundest" and len(info.large_sizes) == 2
        assert info.kept_voxels == max(info.large_sizes)  # the head is also the larger one
    if case == "two_big_elongated":
        assert info.outcome == "largest-roundest" and len(info.large_sizes) == 2
        assert info.kept_voxels < max(info.large_sizes)  # the rounder, smaller one won


def test_roundness_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    comp = _blob((40, 50, 45), (20, 25, 22), (15, 20, 12))
    comp[5:10, 5:30, 20:25] = True
    comp = ndimage.label(comp, ndimage.generate_binary_structure(3, 1))[0] == 1
    image = sitk.GetImageFromArray(comp.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing((0.9, 1.1, 1.3))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.SetComputePerimeter(True)
    stats.Execute(image)
    assert itk_roundness(comp, (0.9, 1.1, 1.3)) == pytest.approx(stats.GetRoundness(1), rel=1e-12)
    assert MIN_ICV_COMPONENT_VOXELS == 200_000


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), ()), ((2, 0, 1), (0,)), ((1, 2, 0), (1, 2))])
def test_orientation_round_trip(perm, flips):
    img = synthetic_head(shape=(20, 24, 22))
    data = np.asarray(img.dataobj)
    moved = data.transpose(perm)
    affine = img.affine[:, list(perm) + [3]]
    for f in flips:
        moved = np.flip(moved, f)
        affine = affine @ nib.affines.from_matvec(
            np.diag([-1 if i == f else 1 for i in range(3)]),
            [moved.shape[f] - 1 if i == f else 0 for i in range(3)],
        )
    moved_img = nib.Nifti1Image(np.ascontiguousarray(moved), affine)
    lps, source = to_reference_orientation(moved_img)
    assert "".join(nib.aff2axcodes(lps.affine)) == "LPS"
    ref_lps, _ = to_reference_orientation(img)
    np.testing.assert_array_equal(np.asarray(lps.dataobj), np.asarray(ref_lps.dataobj))
    np.testing.assert_allclose(lps.affine, ref_lps.affine)
    np.testing.assert_array_equal(
        from_reference_orientation(np.asarray(lps.dataobj), source), moved
    )


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_models):
    opts = InferenceOptions(num_threads=2, use_mirroring=False)
    dirs = [tiny_models]
    return DLMUSEPipeline(
        load_trained_model(find_model("DLICV", dirs)).predictor(opts),
        load_trained_model(find_model("DLMUSE", dirs)).predictor(opts),
    )


def test_pipeline_outputs_on_the_input_grid(tiny_pipeline, tmp_path):
    src = synthetic_head(shape=(60, 70, 56))
    # an LIA, oblique-free header with different sform and qform codes
    affine = nib.affines.from_matvec(
        np.array([[-2.0, 0, 0], [0, 0, 2.0], [0, -2.0, 0]]), [60, -50, 70]
    )
    img = nib.Nifti1Image(np.asarray(src.dataobj).astype(np.uint8), affine)
    img.set_sform(affine, 2)
    img.set_qform(affine, 1)
    path = tmp_path / "head.nii.gz"
    nib.save(img, path)
    loaded = load_t1w(path)
    result = tiny_pipeline.run(loaded)
    for out in (result.labels, result.icv_mask):
        assert out.shape == img.shape
        assert out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.affine, img.affine)
        assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    labels = np.asarray(result.labels.dataobj)
    mask = np.asarray(result.icv_mask.dataobj)
    assert set(np.unique(labels)) <= {0, *single_roi_ids()}
    assert set(np.unique(mask)) <= {0, 1}
    # label 1 is exactly the ICV voxels DLMUSE left unlabelled
    assert np.all(mask[labels == 1] == 1)
    assert not np.any((mask == 1) & (labels == 0))
    assert result.source_orientation == "LIA"
    voxel = 8.0
    for roi, vol in result.single_volumes.items():
        assert vol == np.count_nonzero(labels == roi) * voxel
    icv_members = volume_roi_members()[702]
    assert result.volumes[702] == np.isin(labels, icv_members).sum() * voxel
    assert all(info.n_tiles >= 1 for info in result.predictions.values())
    # run() went through STEPS, in its order
    assert list(result.seconds) == [step.name for step in STEPS]
    assert [s.name for s in STEPS] == [
        "reorient",
        "dlicv",
        "mask_crop",
        "dlmuse",
        "paste",
        "volumes",
    ]


def test_pipeline_rejects_wrong_models(tiny_pipeline):
    with pytest.raises(ValueError, match="2 classes"):
        DLMUSEPipeline(tiny_pipeline.dlmuse, tiny_pipeline.dlmuse)
    with pytest.raises(ValueError, match=f"{len(class_to_muse_lut())} classes"):
        DLMUSEPipeline(tiny_pipeline.dlicv, tiny_pipeline.dlicv)


def test_step_sources_wire_each_value_from_its_maker(monkeypatch):
    wiring = step_sources()
    assert wiring["reorient"] == {"in_file": ("t1w", "t1w")}
    assert wiring["dlmuse"] == {
        "in_file": ("mask_crop", "crop_file"),
        "zooms": ("reorient", "zooms"),
    }
    assert wiring["paste"]["crop_labels"] == ("dlmuse", "out_file")
    # a step reading what only a later step makes is refused, naming both
    swapped = (STEPS[0], STEPS[2], STEPS[1], *STEPS[3:])
    monkeypatch.setattr(pipeline, "STEPS", swapped)
    with pytest.raises(ValueError, match=r"mask_crop reads \['raw_mask'\]"):
        step_sources()
