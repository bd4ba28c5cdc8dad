"""Tests of the test support: random-weight model folders and the reference-engine runners."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.support.models import (
    build_model_folder,
    build_models_dir,
    build_network,
    count_parameters,
    legacy_to_architecture,
    load_plans_source,
    make_plans,
)
from tests.support.paths import (
    DATA_DIR,
    DLICV_DATASET,
    DLICV_PLANS_SOURCE,
    DLMUSE_DATASET,
    DLMUSE_PLANS_SOURCE,
    TRAINED_MODEL_SUBDIR,
)
from tests.support.reference import nnunet_predict

SOURCES = {"dlicv": DLICV_PLANS_SOURCE, "dlmuse": DLMUSE_PLANS_SOURCE}
# Sizes of the official fold_0/checkpoint_final.pth files (../shared/models/README.md).
OFFICIAL_CHECKPOINT_BYTES = {"dlicv": 246_584_635, "dlmuse": 137_665_621}
REAL_T1W = DATA_DIR / "t1w" / "sub-otsu_T1w.nii.gz"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data/models live in ../shared beside the repo)")
    return path


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(name, folder with official plans) for each model."""
    return request.param, _require(SOURCES[request.param] / "plans.json").parent


def _load(model_dir: Path, fold: int = 0) -> dict:
    return torch.load(
        model_dir / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )


def _synthetic_image(path: Path, shape=(60, 70, 50), spacing: float = 1.2) -> Path:
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 30.0, shape).astype(np.float32)
    data[20:40, 25:45, 15:35] += 200.0  # a bright block so that the image is not pure noise
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30.0, -40.0, -25.0]
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def test_model_folder_layout(tmp_path: Path, source: tuple[str, Path]) -> None:
    name, plans_source = source
    model_dir = build_model_folder(tmp_path, plans_source, folds=(0, 3))
    assert model_dir == tmp_path / plans_source.name / TRAINED_MODEL_SUBDIR
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "dataset.json",
        "fold_0",
        "fold_3",
        "plans.json",
    ]
    official_plans, official_dataset = load_plans_source(plans_source)
    plans = json.loads((model_dir / "plans.json").read_text())
    assert json.loads((model_dir / "dataset.json").read_text()) == official_dataset

    # Only the width of 3d_fullres differs from the official plans.
    expected = copy.deepcopy(official_plans)
    expected["configurations"]["3d_fullres"].update(
        UNet_base_num_features=4, unet_max_num_features=16
    )
    assert plans == expected

    checkpoint = _load(model_dir, 3)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert checkpoint["current_epoch"] == 1000
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert checkpoint["init_args"]["fold"] == 3
    assert checkpoint["init_args"]["plans"] == plans
    assert checkpoint["init_args"]["dataset_json"] == official_dataset
    assert isinstance(checkpoint["logging"]["mean_fg_dice"][0], np.float64)
    assert isinstance(checkpoint["_best_ema"], np.float64)
    n_params = len(checkpoint["optimizer_state"]["param_groups"][0]["params"])
    assert n_params == len(checkpoint["optimizer_state"]["state"])
    # The state dict holds aliases (conv.* == all_modules.0.*, decoder.encoder.* == encoder.*).
    weights = checkpoint["network_weights"]
    for key, value in weights.items():
        if key.startswith("decoder.encoder."):
            assert torch.equal(value, weights[key.removeprefix("decoder.")])
        if ".all_modules.0." in key:
            assert torch.equal(value, weights[key.replace(".all_modules.0.", ".conv.")])


def test_legacy_conversion_matches_nnunet(source: tuple[str, Path]) -> None:
    plans_handler = pytest.importorskip("nnunetv2.utilities.plans_handling.plans_handler")
    plans, _ = load_plans_source(source[1])
    for name, cfg in plans["configurations"].items():
        if "UNet_class_name" not in cfg:
            continue
        with pytest.warns(UserWarning, match="old nnU-Net plans format"):
            reference = plans_handler.ConfigurationManager(copy.deepcopy(cfg)).configuration
        assert legacy_to_architecture(cfg) == reference, name


@pytest.mark.parametrize("legacy_plans", [True, False], ids=["legacy", "architecture"])
def test_checkpoint_loads_in_nnunet(
    tmp_path: Path, source: tuple[str, Path], legacy_plans: bool
) -> None:
    predict = pytest.importorskip("nnunetv2.inference.predict_from_raw_data")
    model_dir = build_model_folder(tmp_path, source[1], legacy_plans=legacy_plans, guided=True)
    plans = json.loads((model_dir / "plans.json").read_text())
    assert ("architecture" in plans["configurations"]["3d_fullres"]) is not legacy_plans

    predictor = predict.nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), (0,))
    loaded = predictor.network.state_dict()
    saved = _load(model_dir)["network_weights"]
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert predictor.allowed_mirroring_axes == (0, 1, 2)
    assert predictor.network.encoder.output_channels[0] == 4


def test_folds_differ_and_seeds_reproduce(tmp_path: Path) -> None:
    source = _require(DLMUSE_PLANS_SOURCE)
    model_dir = build_model_folder(tmp_path / "a", source, folds=(0, 1))
    again = build_model_folder(tmp_path / "b", source, folds=(0,))
    fold0, fold1 = _load(model_dir, 0)["network_weights"], _load(model_dir, 1)["network_weights"]
    same = [k for k in fold0 if torch.equal(fold0[k], fold1[k])]
    assert same == []
    # Same seed, same bytes (fixed log timestamps; torch.save is deterministic).
    name = "fold_0/checkpoint_final.pth"
    assert (model_dir / name).read_bytes() == (again / name).read_bytes()


def test_guided_network_follows_intensity() -> None:
    """On a bright cube in a dark, noisy volume the guided net calls the cube foreground."""
    plans, dataset = load_plans_source(_require(DLICV_PLANS_SOURCE))
    from tests.support.guidance import add_intensity_guidance
    from tests.support.models import perturb_norms_and_biases

    cfg = make_plans(plans, base_features=4, max_features=16)["configurations"]["3d_fullres"]
    torch.manual_seed(0)
    network = build_network(cfg, 1, len(dataset["labels"]))
    perturb_norms_and_biases(network)
    add_intensity_guidance(network)
    network.eval()
    image = torch.randn(1, 1, 160, 128, 112, generator=torch.Generator().manual_seed(0)) * 0.2
    image[..., 40:120, 30:100, 30:90] += 2.0
    with torch.no_grad():
        fg = network(image).argmax(1)[0].numpy().astype(bool)
    inside = np.zeros_like(fg)
    inside[50:110, 40:90, 40:80] = True
    assert fg[inside].mean() > 0.9
    assert fg[:, :, :20].mean() < 0.1


def test_full_width_parameter_counts_explain_official_sizes(source: tuple[str, Path]) -> None:
    name, plans_source = source
    plans, dataset = load_plans_source(plans_source)
    cfg = make_plans(plans, base_features=32, max_features=320)["configurations"]["3d_fullres"]
    n = count_parameters(build_network(cfg, 1, len(dataset["labels"])))
    assert n == {"dlicv": 30_785_994, "dlmuse": 16_620_192}[name]
    # float32 weights + one SGD momentum buffer per parameter; the rest is pickle and the log.
    weights_and_momentum = 8 * n
    assert weights_and_momentum < OFFICIAL_CHECKPOINT_BYTES[name] < 1.05 * weights_and_momentum


@pytest.mark.parametrize("model", ["dlicv", "dlmuse"])
def test_nnunet_predict_synthetic(tmp_path: Path, model: str) -> None:
    pytest.importorskip("nnunetv2")
    model_dir = build_model_folder(tmp_path / "models", _require(SOURCES[model]))
    image = _synthetic_image(tmp_path / "img.nii.gz")
    # A folder gets <image name>.nii.gz; a .nii.gz path is used as it is.
    out = tmp_path / "out" if model == "dlicv" else tmp_path / "x" / "seg.nii.gz"
    label_file = nnunet_predict(model_dir, image, out, use_mirroring=False)
    assert label_file == (out / "img.nii.gz" if model == "dlicv" else out)
    labels = nib.load(label_file)
    assert labels.shape == (60, 70, 50)
    assert np.allclose(labels.affine, nib.load(image).affine, atol=1e-4)
    n_classes = 2 if model == "dlicv" else 152
    assert np.asarray(labels.dataobj).max() < n_classes


def test_build_models_dir_layout(tmp_path: Path) -> None:
    _require(DLICV_PLANS_SOURCE)
    _require(DLMUSE_PLANS_SOURCE)
    dest = build_models_dir(tmp_path / "models", with_optimizer_state=False)
    for dataset in (DLICV_DATASET, DLMUSE_DATASET):
        assert (
            dest / dataset / TRAINED_MODEL_SUBDIR / "fold_0" / "checkpoint_final.pth"
        ).is_file()


def test_guided_dlicv_on_real_scan(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2")
    scan = _require(REAL_T1W)
    model_dir = build_model_folder(tmp_path / "models", _require(DLICV_PLANS_SOURCE), guided=True)
    label_file = nnunet_predict(model_dir, scan, tmp_path / "out", use_mirroring=False)
    mask = np.asarray(nib.load(label_file).dataobj) > 0
    labelled, _ = ndimage.label(mask)  # 6-connected, as DLICV's SimpleITK ConnectedComponent
    largest = np.bincount(labelled.ravel())[1:].max()
    assert 0.02 < mask.mean() < 0.6
    assert largest > 200_000
