"""Model lookup, safe checkpoint loading and official-file checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dlmuse_bids import models
from dlmuse_bids.models import (
    ModelError,
    ModelNotFoundError,
    OfficialModel,
    find_model,
    load_checkpoint,
    load_trained_model,
    model_search_dirs,
)
from dlmuse_bids.nnunet.predictor import Predictor
from dlmuse_bids.settings import InferenceOptions
from tests.support.paths import DLICV_DATASET, DLMUSE_DATASET, TRAINED_MODEL_SUBDIR


class Evil:
    """Anything that is not a tensor or a container: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_search_order_and_cache(tmp_path):
    env = {"DLMUSE_MODEL_DIR": str(tmp_path / "env"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    dirs = model_search_dirs(tmp_path / "cli", env)
    assert dirs == [
        tmp_path / "cli",
        tmp_path / "env",
        tmp_path / "xdg" / "dlmuse-bids" / "models",
    ]
    assert model_search_dirs(None, {"HOME": str(tmp_path)}) == [
        tmp_path / ".cache" / "dlmuse-bids" / "models"
    ]


def test_missing_model_names_every_place(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ModelNotFoundError) as err:
        find_model("DLMUSE", dirs)
    msg = str(err.value)
    assert "\n" not in msg
    for d in dirs:
        assert str(d / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR) in msg
        assert str(d / "nnunet_results" / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR) in msg
    assert "nichart/DLMUSE" in msg and "--model-dir" in msg


def test_both_layouts_are_found(narrow_models, tmp_path):
    assert find_model("DLICV", [tmp_path / "nothing", narrow_models]) == (
        narrow_models / DLICV_DATASET / TRAINED_MODEL_SUBDIR
    )
    hf = tmp_path / "snapshot" / "nnunet_results"
    shutil.copytree(narrow_models / DLMUSE_DATASET, hf / DLMUSE_DATASET)
    assert (
        find_model("DLMUSE", [tmp_path / "snapshot"]) == hf / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR
    )


def test_checkpoint_with_numpy_log_loads_weights_only(narrow_models):
    folder = narrow_models / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR
    model = load_trained_model(folder)
    assert model.folds == [0]
    assert model.mirror_axes == (0, 1, 2)
    assert len(model.sha256["fold_0"]) == 64
    assert model.config.num_classes == 152
    assert isinstance(model.predictor(InferenceOptions()), Predictor)


def test_arbitrary_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "fold_0" / "checkpoint_final.pth"
    path.parent.mkdir()
    torch.save({"network_weights": {}, "payload": Evil()}, path)
    with pytest.raises(ModelError, match="refusing"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_damaged_official_file_is_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(3)}}, path)
    fake = OfficialModel("DLICV", DLICV_DATASET, "nichart/DLICV", path.stat().st_size, "0" * 64)
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(1))
    with pytest.raises(ModelError, match=r"nichart/DLICV\).*dlmuse models fetch"):
        load_checkpoint(path, fake)
    assert not loaded


def test_verified_official_file_may_need_full_unpickling(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(3)}, "extra": Path("x")}, path)
    with pytest.raises(ModelError):
        load_checkpoint(path)
    good = OfficialModel(
        "DLICV", DLICV_DATASET, "nichart/DLICV", path.stat().st_size, models.sha256_file(path)
    )
    ckpt, digest = load_checkpoint(path, good)
    assert digest == good.sha256 and ckpt["extra"] == Path("x")


def test_folds_and_mismatched_weights(narrow_models, tmp_path):
    folder = tmp_path / DLICV_DATASET / TRAINED_MODEL_SUBDIR
    shutil.copytree(narrow_models / DLICV_DATASET / TRAINED_MODEL_SUBDIR, folder)
    shutil.copytree(folder / "fold_0", folder / "fold_3")
    assert load_trained_model(folder).folds == [0, 3]
    with pytest.raises(ModelError, match="fold 1 requested"):
        load_trained_model(folder, [1])
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ckpt["network_weights"] = {
        k: v[..., :1] if v.ndim > 1 else v for k, v in ckpt["network_weights"].items()
    }
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    model = load_trained_model(folder, [0])
    with pytest.raises(ModelError, match="does not match"):
        model.predictor(InferenceOptions())


def test_missing_plans_is_a_model_error(tmp_path):
    (tmp_path / "fold_0").mkdir()
    with pytest.raises(ModelError, match="plans.json"):
        load_trained_model(tmp_path)
