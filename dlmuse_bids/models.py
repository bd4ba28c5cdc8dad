"""Where the DLICV and DLMUSE models are found, how their files are checked, and loading them.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing but tensors, containers and
numpy scalars (which nnU-Net's training logger leaves in every checkpoint) is ever unpickled. A
file that needs more is only loaded when its sha256 is that of an official release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .nnunet.plans import ModelConfig, PlansError, load_model_config
from .settings import InferenceOptions, ModelInfo

if TYPE_CHECKING:  # torch is imported where weights are loaded, not to find or check models
    from .nnunet.predictor import Predictor

logger = logging.getLogger(__name__)

TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CHECKPOINT = "checkpoint_final.pth"
WEIGHTS_HELP = (
    "The official weights (CBICA non-commercial licence) are on HuggingFace: nichart/DLICV and "
    "nichart/DLMUSE. Put both model folders in one directory and pass it with --model-dir or "
    "DLMUSE_MODEL_DIR"
)


@dataclass(frozen=True)
class OfficialModel:
    """An official model release: its folder name and its fold-0 checkpoint's identity."""

    key: str
    dataset: str
    hf_repo: str
    size: int
    sha256: str


OFFICIAL_MODELS: dict[str, OfficialModel] = {
    "DLICV": OfficialModel(
        "DLICV",
        "Dataset901_Task901_dlicv",
        "nichart/DLICV",
        246_584_635,
        "2926aa70504a040489ec0fd16da359e2191cbd235a83f4d466d1500dc78f40ba",
    ),
    "DLMUSE": OfficialModel(
        "DLMUSE",
        "Dataset903_Task903_DLMUSEV2",
        "nichart/DLMUSE",
        137_665_621,
        "7e0d2a58186ccc36007831e984155000068d0462b206dc723dadb839d37e3988",
    ),
}


class ModelError(RuntimeError):
    """A model folder is missing, incomplete or untrustworthy (exit code: EX_NOINPUT)."""

    exit_code = 66


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No folder of a model in any of the places looked in."""


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """Per-user model cache: ``$XDG_CACHE_HOME/dlmuse-bids/models`` (``~/.cache`` by default)."""
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "dlmuse-bids" / "models"


def model_search_dirs(model_dir: Path | None, env: Mapping[str, str]) -> list[Path]:
    """Directories searched for models, in order: ``--model-dir``, ``DLMUSE_MODEL_DIR``, cache."""
    dirs = []
    if model_dir is not None:
        dirs.append(Path(model_dir))
    if env.get("DLMUSE_MODEL_DIR"):
        dirs.append(Path(env["DLMUSE_MODEL_DIR"]))
    dirs.append(default_cache_dir(env))
    return dirs


def _candidates(base: Path, dataset: str) -> list[Path]:
    return [base / dataset / TRAINER_DIR, base / "nnunet_results" / dataset / TRAINER_DIR]


def find_model(key: str, search_dirs: Sequence[Path]) -> Path:
    """Trained-model folder of an official model (``"DLICV"`` or ``"DLMUSE"``).

    Both layouts are accepted: ``DIR/<dataset>/<trainer>`` and the HuggingFace snapshot's
    ``DIR/nnunet_results/<dataset>/<trainer>``. A folder counts when it holds ``plans.json``.

    Raises
    ------
    ModelNotFoundError
        Naming every place looked in and how to get the weights.
    """
    model = OFFICIAL_MODELS[key]
    looked = []
    for base in search_dirs:
        for cand in _candidates(Path(base), model.dataset):
            looked.append(str(cand))
            if (cand / "plans.json").is_file():
                return cand
    raise ModelNotFoundError(
        f"{key} model not found; looked in: {'; '.join(looked)}. {WEIGHTS_HELP} "
        f"({model.hf_repo}: nnunet_results/{model.dataset}/{TRAINER_DIR})"
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _numpy_safe_globals() -> list:
    """Numpy objects nnU-Net checkpoints contain (scalars in the training log), both spellings."""
    core = np._core.multiarray  # numpy >= 2
    items: list = []
    for obj, name in ((core.scalar, "scalar"), (core._reconstruct, "_reconstruct")):
        items += [(obj, f"numpy._core.multiarray.{name}"), (obj, f"numpy.core.multiarray.{name}")]
    items += [np.ndarray, np.dtype]
    items += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return items


#: Written by ``dlmuse models fetch`` into each model folder it downloaded: from then on its
#: fold-0 checkpoint must stay exactly the file that was fetched (size and sha256).
OFFICIAL_MARKER = ".dlmuse-official.json"
REFETCH_HINT = "fetch it again with `dlmuse models fetch --dest DIR` (DIR: the models directory)"


def verify_checkpoint(
    path: Path, official: OfficialModel | None = None, fetched: dict | None = None
) -> str:
    """The sha256 of a checkpoint, once its size and digest are those it must have.

    See :func:`load_checkpoint` for ``official`` and ``fetched``; nothing is unpickled here.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file missing")
    size = path.stat().st_size
    if fetched is not None and size != fetched.get("size"):
        raise ModelError(
            f"{path}: {size} bytes, but the checkpoint fetched from {fetched.get('repo')} has "
            f"{fetched.get('size')}; the file is damaged: {REFETCH_HINT}"
        )
    digest = sha256_file(path)
    if fetched is not None and digest != fetched.get("sha256"):
        raise ModelError(
            f"{path}: sha256 {digest} is not that of the checkpoint fetched from "
            f"{fetched.get('repo')} ({fetched.get('sha256')}); the file is damaged: {REFETCH_HINT}"
        )
    if official is not None and size == official.size and digest != official.sha256:
        raise ModelError(
            f"{path}: sha256 {digest} is not the official {official.key} checkpoint's "
            f"({official.sha256}, {official.hf_repo}); the file is damaged: {REFETCH_HINT}"
        )
    return digest


def load_checkpoint(
    path: Path, official: OfficialModel | None = None, *, fetched: dict | None = None
) -> tuple[dict, str]:
    """Load an nnU-Net checkpoint safely; return it with its sha256.

    Parameters
    ----------
    path
        ``fold_K/checkpoint_final.pth``.
    official
        The official model this file should be, if any. A file with the official size but not
        its sha256 is refused before loading (a damaged download); a file that needs more than
        ``weights_only`` is loaded only when its sha256 is the official one.
    fetched
        The record of :data:`OFFICIAL_MARKER` when ``dlmuse models fetch`` downloaded this
        folder (``repo``, ``size``, ``sha256``): any other size or sha256 (a truncated or
        altered file) is refused before loading.
    """
    import torch

    path = Path(path)
    digest = verify_checkpoint(path, official, fetched)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        if official is None or digest != official.sha256:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{path}: not a loadable weights-only checkpoint ({first}); refusing "
                "to unpickle arbitrary objects from an unverified file"
            ) from exc
        logger.info("%s: verified official %s checkpoint, loading in full", path, official.key)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt, digest


def available_folds(folder: Path) -> list[int | str]:
    """Folds with a final checkpoint, sorted (``fold_all`` last)."""
    folds: list[int | str] = []
    for sub in sorted(Path(folder).glob("fold_*")):
        if (sub / CHECKPOINT).is_file():
            tail = sub.name[len("fold_") :]
            folds.append(int(tail) if tail.isdigit() else tail)
    return sorted(folds, key=lambda f: (isinstance(f, str), str(f).zfill(4)))


@dataclass
class TrainedModel:
    """A loaded trained-model folder: plans, per-fold weights, and where they came from."""

    folder: Path
    config: ModelConfig
    folds: list[int | str]
    fold_weights: list[dict] = field(repr=False)
    mirror_axes: tuple[int, ...] | None
    sha256: dict[str, str]

    def info(self, name: str) -> ModelInfo:
        """Its identity for provenance (``name``: ``"DLICV"`` or ``"DLMUSE"``)."""
        return ModelInfo(name, self.folder.absolute(), tuple(self.folds), dict(self.sha256))

    def predictor(self, options: InferenceOptions) -> Predictor:
        """A :class:`Predictor` of this model; weights that do not fit the plans are an error."""
        from .nnunet.predictor import Predictor

        try:
            return Predictor(self.config, self.fold_weights, self.mirror_axes, options)
        except ValueError as exc:
            raise ModelError(f"{self.folder}: {exc}") from exc


def _configuration_name(folder: Path) -> str:
    match = re.fullmatch(r".+__.+__(.+)", Path(folder).name)
    return match.group(1) if match else "3d_fullres"


def _official_for(folder: Path) -> OfficialModel | None:
    for model in OFFICIAL_MODELS.values():
        if Path(folder).resolve().parent.name == model.dataset:
            return model
    return None


def _fetch_record(folder: Path) -> dict | None:
    """The :data:`OFFICIAL_MARKER` record of a fetched model folder, or None."""
    marker = Path(folder) / OFFICIAL_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{marker}: unreadable ({exc}): {REFETCH_HINT}") from exc
    if not isinstance(record, dict):
        raise ModelError(f"{marker}: not a fetch record: {REFETCH_HINT}")
    return record


def _model_config(folder: Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: model folder not found")
    try:
        return load_model_config(folder, _configuration_name(folder))
    except PlansError as exc:
        raise ModelError(str(exc)) from exc


def model_classes(folder: Path) -> int:
    """The number of classes a model folder's plans give (its weights are not read)."""
    return _model_config(folder).num_classes


def describe_model(name: str, folder: Path) -> ModelInfo:
    """The identity of a model folder (every fold's checkpoint digest), without loading weights.

    The fold-0 checkpoint is checked as :func:`load_checkpoint` checks it before unpickling.
    """
    folder = Path(folder)
    folds = available_folds(folder)
    if not folds:
        raise ModelError(f"{folder}: no fold_*/{CHECKPOINT} found")
    official = _official_for(folder)
    digests = {}
    for fold in folds:
        path = folder / f"fold_{fold}" / CHECKPOINT
        first = str(fold) == "0"
        digests[f"fold_{fold}"] = verify_checkpoint(
            path, official if first else None, _fetch_record(folder) if first else None
        )
    return ModelInfo(name, folder.absolute(), tuple(folds), digests)


def load_trained_model(folder: Path, folds: Sequence[int | str] | None = None) -> TrainedModel:
    """Load an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``, folds).

    Parameters
    ----------
    folder
        The ``<trainer>__<plans>__<configuration>`` folder.
    folds
        Folds to use; all folds with ``checkpoint_final.pth`` when None.
    """
    folder = Path(folder)
    config = _model_config(folder)
    present = available_folds(folder)
    if folds is None:
        folds = present
    if not folds:
        raise ModelError(f"{folder}: no fold_*/{CHECKPOINT} found")
    official = _official_for(folder)
    weights, digests, mirror_axes = [], {}, None
    for i, fold in enumerate(folds):
        path = folder / f"fold_{fold}" / CHECKPOINT
        if not path.is_file():
            raise ModelError(
                f"{path}: fold {fold} requested but its checkpoint is missing "
                f"(available folds: {present or 'none'})"
            )
        first = str(fold) == "0"
        ckpt, digest = load_checkpoint(
            path, official if first else None, fetched=_fetch_record(folder) if first else None
        )
        digests[f"fold_{fold}"] = digest
        weights.append(ckpt["network_weights"])
        if i == 0:
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else None
    return TrainedModel(
        folder=folder,
        config=config,
        folds=list(folds),
        fold_weights=weights,
        mirror_axes=mirror_axes,
        sha256=digests,
    )
