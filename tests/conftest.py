"""Shared fixtures: model folders with seeded random weights and small synthetic heads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.support.paths import DATA_DIR, OFFICIAL_MODELS_DIR, TRAINED_MODEL_SUBDIR

# The test machine has no network: no command a test runs may fetch on first use (CLI
# subprocesses and SLURM jobs inherit this); the fetch tests serve files on loopback and unset it.
os.environ.setdefault("DLMUSE_OFFLINE", "1")

needs_shared = pytest.mark.skipif(
    not OFFICIAL_MODELS_DIR.is_dir() or not DATA_DIR.is_dir(),
    reason=f"shared data not found at {OFFICIAL_MODELS_DIR.parent} (CI has it beside the repo)",
)


def shrink_plans(models_dir: Path, spacing: float, patches: dict[str, list[int]]) -> None:
    """Give both models a coarser spacing and a smaller patch (same weights) for fast tests."""
    for dataset, patch in patches.items():
        plans_path = models_dir / dataset / TRAINED_MODEL_SUBDIR / "plans.json"
        plans = json.loads(plans_path.read_text())
        cfg = plans["configurations"]["3d_fullres"]
        cfg["spacing"] = [spacing] * 3
        cfg["patch_size"] = patch
        plans_path.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="session")
def narrow_models(tmp_path_factory) -> Path:
    """Both official plans, narrow seeded random networks (DLICV intensity-guided)."""
    if not OFFICIAL_MODELS_DIR.is_dir():
        pytest.skip(f"official plans not found at {OFFICIAL_MODELS_DIR}")
    from tests.support.models import build_models_dir

    return build_models_dir(tmp_path_factory.mktemp("narrow_models"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The narrow models with 2 mm spacing and patches that take a test head in one tile.

    A whole pipeline in a few seconds: at this width the time goes to each tile's fixed costs,
    so one large tile is about 5x faster than 18 small ones. Tiling and blending are tested with
    the narrow models (test_nnunet.py, test_equivalence.py).
    """
    if not OFFICIAL_MODELS_DIR.is_dir():
        pytest.skip(f"official plans not found at {OFFICIAL_MODELS_DIR}")
    from tests.support.models import build_models_dir
    from tests.support.paths import DLICV_DATASET, DLMUSE_DATASET

    out = build_models_dir(tmp_path_factory.mktemp("tiny_models"))
    shrink_plans(out, 2.0, {DLICV_DATASET: [96, 128, 96], DLMUSE_DATASET: [80, 96, 80]})
    return out


def synthetic_head(shape=(60, 70, 56), zoom=2.0, seed=0) -> nib.Nifti1Image:
    """An ellipsoidal 'head' with a bright 'brain', darker 'skull' and noise, RAS, uint8-like."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    data = np.where(r < 0.95, 40.0, 0.0) + np.where(r < 0.8, 80.0, 0.0)
    data += np.where(r < 0.8, 30 * np.sin(8 * grid[0]) * np.cos(6 * grid[1]), 0.0)
    data = np.clip(data + rng.normal(0, 3, shape) * (r < 0.95), 0, 255).astype(np.float32)
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -np.array(shape) * zoom / 2
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


@pytest.fixture
def head_file(tmp_path) -> Path:
    """A small synthetic head written as sub-01_T1w.nii.gz."""
    path = tmp_path / "in" / "sub-01_T1w.nii.gz"
    path.parent.mkdir()
    nib.save(synthetic_head(), path)
    return path


def _engine_unavailable(why: str):
    """Skip a container test with the reason; under CI=true it must run, so fail instead."""
    import os

    if os.environ.get("CI") == "true":
        pytest.fail(f"container tests must run in CI: {why}")
    pytest.skip(why)


#: the fixtures of the tests that run the built image
CONTAINER_FIXTURES = {"container_engine", "app_image"}
IMAGE_BUILDER = pytest.StashKey()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Run the container tests last, and prepare their engine and image meanwhile."""
    uses = [item for item in items if CONTAINER_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if not uses or not DATA_DIR.is_dir():
        return
    chosen = set(uses)
    items[:] = [item for item in items if item not in chosen] + uses
    import tempfile

    from tests.support.containers import ImageBuilder

    builder = ImageBuilder(Path(tempfile.mkdtemp(prefix="dlmuse-image-tests-")))
    builder.start()
    config.stash[IMAGE_BUILDER] = builder
    config.add_cleanup(builder.stop)


def _prepared(request):
    """The engine, image and template home made by the builder, or skip/fail saying why."""
    from tests.support.containers import EngineUnavailableError

    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    builder = request.config.stash.get(IMAGE_BUILDER, None)
    if builder is None:
        pytest.skip("no container test was collected")
    try:
        return builder.wait()
    except EngineUnavailableError as exc:
        _engine_unavailable(str(exc))


@pytest.fixture(scope="session")
def container_engine(request):
    """A private dockerd for this test session, with the base image made locally if needed."""
    return _prepared(request)[0]


@pytest.fixture(scope="session")
def app_image(request):
    """The app's image built from this checkout once per session (CPU torch, no weights, the
    test template, Colin27 standing in for MNI152NLin2009cAsym, baked in) and that template."""
    _, built, templates = _prepared(request)
    return built, templates
