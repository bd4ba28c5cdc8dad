"""Equivalence with the reference engine (nnunetv2 2.8.1) and pipeline (NiChart_DLMUSE 1.0.10).

Narrow random-weight models built from the real plans, real scans from ``../shared/data/t1w``.
Agreement is measured over the voxels that either label map calls non-background.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids.cli import dlmuse_main
from dlmuse_bids.pipeline import to_reference_orientation
from tests.conftest import needs_shared
from tests.support.paths import (
    DATA_DIR,
    DLICV_DATASET,
    DLMUSE_DATASET,
    TRAINED_MODEL_SUBDIR,
)

pytestmark = needs_shared
T1W = DATA_DIR / "t1w"
MIN_AGREEMENT = 0.999


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of voxels labelled non-background by either map on which both agree."""
    assert a.shape == b.shape
    either = (a > 0) | (b > 0)
    return float(np.mean(a[either] == b[either])) if either.any() else 1.0


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _report(name: str, **values) -> None:
    """Print one line of measured numbers (shown with ``pytest -rP``)."""
    print(f"EQUIVALENCE {name}: {json.dumps(values)}")


def _block(name: str, box: tuple[slice, ...], dest: Path) -> Path:
    """A block of a real scan, with the affine of the block (keeps CI time in check)."""
    img = nib.load(T1W / name)
    block = np.asarray(img.dataobj)[box]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [s.start for s in box] + img.affine[:3, 3]
    out = nib.Nifti1Image(block, affine, img.header)
    out.set_sform(affine)
    out.set_qform(affine)
    path = dest / name.replace("_T1w", "_block")
    nib.save(out, path)
    return path


@pytest.fixture(scope="module")
def dep01_block(tmp_path_factory) -> Path:
    """The skull-stripped 0.868x0.868x1 mm scan around the brain (resampled by both engines),
    in one DLMUSE tile: blending is tested by DLICV's test here and, for DLMUSE's plans, against
    nnunetv2's sliding window in test_nnunet.py."""
    return _block(
        "sub-dep01_T1w.nii.gz",
        (slice(90, 200), slice(80, 210), slice(52, 147)),
        tmp_path_factory.mktemp("dep01"),
    )


@pytest.fixture(scope="module")
def chris_block(tmp_path_factory) -> Path:
    """Most of the 0.88 mm head with skull (resampled by both engines); 111 mm wide and 106 mm
    high, so one DLICV tile in x and z, two in y, where the sliding window blends."""
    return _block(
        "sub-chris_T1w.nii.gz",
        (slice(22, 148), slice(30, 230), slice(40, 160)),
        tmp_path_factory.mktemp("chris"),
    )


@pytest.fixture(scope="module")
def two_fold_dlmuse(narrow_models, tmp_path_factory) -> Path:
    from tests.support.models import build_model_folder
    from tests.support.paths import DLMUSE_PLANS_SOURCE

    return build_model_folder(
        tmp_path_factory.mktemp("two_folds"), DLMUSE_PLANS_SOURCE, folds=(0, 1), seed=3
    )


def _compare_predict(
    model: Path, image: Path, tmp: Path, *, folds=(0,), mirroring=True, name: str
) -> float:
    from tests.support.reference import nnunet_predict

    ref = nnunet_predict(model, image, tmp / "ref.nii.gz", folds=folds, use_mirroring=mirroring)
    ours = tmp / "ours.nii.gz"
    args = [
        "predict",
        "--model",
        str(model),
        str(image),
        str(ours),
        "--threads",
        "2",
        "--folds",
        *[str(f) for f in folds],
    ]
    assert dlmuse_main(args if mirroring else [*args, "--no-tta"]) == 0
    a, b = _labels(ref), _labels(ours)
    value = agreement(a, b)
    _report(
        name,
        agreement=value,
        identical_voxels=float(np.mean(a == b)),
        image=image.name,
        folds=list(folds),
        mirroring=mirroring,
    )
    return value


def test_dlicv_088mm_head_with_mirroring(narrow_models, chris_block, tmp_path):
    model = narrow_models / DLICV_DATASET / TRAINED_MODEL_SUBDIR
    assert (
        _compare_predict(model, chris_block, tmp_path, name="DLICV sub-chris 0.88mm TTA")
        >= MIN_AGREEMENT
    )


def test_dlmuse_0868mm_with_mirroring(narrow_models, dep01_block, tmp_path):
    model = narrow_models / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR
    assert (
        _compare_predict(model, dep01_block, tmp_path, name="DLMUSE dep01 0.868x0.868x1mm TTA")
        >= MIN_AGREEMENT
    )


def test_dlmuse_two_folds_without_mirroring(two_fold_dlmuse, dep01_block, tmp_path):
    assert (
        _compare_predict(
            two_fold_dlmuse,
            dep01_block,
            tmp_path,
            folds=(0, 1),
            mirroring=False,
            name="DLMUSE dep01 2 folds no TTA",
        )
        >= MIN_AGREEMENT
    )


def test_pipeline_matches_nichart_dlmuse(tiny_models, tmp_path):
    """The whole pipeline against NiChart_DLMUSE's on a real head: the models' 2 mm plans keep
    it quick, the pipeline's steps (reorientation, DLICV component, crop, relabel, paste) are
    those of any resolution; the engines are compared at 1 mm above."""
    from tests.support.reference import nichart_available, run_nichart

    if not nichart_available():
        pytest.skip("NiChart_DLMUSE/DLICV/DLMUSE (the reference pipeline) not installed")
    # float32 copy of the uint8 scan (same values): NiChart re-quantises integer images when it
    # masks them (see test_pipeline.py::test_nichart_masking_requantises_integer_images), which
    # would feed its DLMUSE different intensities; a float image keeps it exact.
    src = nib.load(T1W / "sub-otsu_T1w.nii.gz")
    head = tmp_path / "in" / "sub-otsu_T1w.nii.gz"
    head.parent.mkdir()
    as_float = nib.Nifti1Image(np.asarray(src.dataobj).astype(np.float32), src.affine, src.header)
    as_float.set_data_dtype(np.float32)
    nib.save(as_float, head)
    ref_dir = run_nichart(tiny_models, [head], tmp_path / "nichart", disable_tta=True)
    ours = tmp_path / "ours"
    assert (
        dlmuse_main(
            [
                "run",
                str(head),
                "-o",
                str(ours),
                "--model-dir",
                str(tiny_models),
                "--no-tta",
                "--mode",
                "exact",  # both networks as nnU-Net computes them: NiChart's arithmetic
                "--threads",
                "2",
            ]
        )
        == 0
    )
    ref_labels = _labels(ref_dir / "sub-otsu_T1w_DLMUSE.nii.gz")
    our_labels = _labels(ours / "sub-otsu_T1w_DLMUSE.nii.gz")
    value = agreement(ref_labels, our_labels)
    # NiChart's own MRID rule strips the common suffix of all inputs; ours strips _T1w only.
    # NiChart_DLMUSE 1.0.10 names its columns by bare ROI id; NiChart's tables (and ours) use
    # DL_MUSE_Volume_<id>.
    ref_csv = pd.read_csv(ref_dir / "DLMUSE_Volumes.csv").drop(columns="MRID")
    our_csv = pd.read_csv(ours / "DLMUSE_Volumes.csv")
    assert our_csv["MRID"].tolist() == ["sub-otsu"]
    our_csv = our_csv.drop(columns="MRID")
    assert [f"DL_MUSE_Volume_{c}" for c in ref_csv.columns] == list(our_csv.columns)
    ref_v, our_v = ref_csv.iloc[0].to_numpy(float), our_csv.iloc[0].to_numpy(float)
    rel = np.abs(ref_v - our_v) / np.maximum(np.abs(ref_v), 1e-9)
    rel[(ref_v == 0) & (our_v == 0)] = 0
    _report(
        "pipeline vs NiChart_DLMUSE sub-otsu no TTA",
        agreement=value,
        identical_voxels=float(np.mean(ref_labels == our_labels)),
        max_volume_rel_diff=float(rel.max()),
        icv_ml=float(our_v[0] / 1000),
    )
    assert value >= MIN_AGREEMENT
    assert rel.max() <= 1e-3
    # NiChart keeps its ICV mask in LPS, in its working directory
    icv_ref = _labels(ref_dir / "temp_working_dir" / "s2_dlicv" / "sub-otsu_T1w_DLICV.nii.gz")
    icv_ours, _ = to_reference_orientation(nib.load(ours / "sub-otsu_T1w_DLICV.nii.gz"))
    assert agreement(icv_ref, np.asarray(icv_ours.dataobj)) >= MIN_AGREEMENT
