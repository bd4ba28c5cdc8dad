"""Where the shared real data and official model metadata live, relative to the repository."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = REPO_ROOT.parent / "shared"
DATA_DIR = SHARED_DIR / "data"
OFFICIAL_MODELS_DIR = SHARED_DIR / "models"

DLICV_DATASET = "Dataset901_Task901_dlicv"
DLMUSE_DATASET = "Dataset903_Task903_DLMUSEV2"
TRAINED_MODEL_SUBDIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"

DLICV_PLANS_SOURCE = OFFICIAL_MODELS_DIR / DLICV_DATASET
DLMUSE_PLANS_SOURCE = OFFICIAL_MODELS_DIR / DLMUSE_DATASET
#: The brain-trained DLICV stand-in (official plans at 1/4 width): the instrument for agreement.
STANDIN_MODELS_DIR = SHARED_DIR / "models-standin"
STANDIN_DLICV = STANDIN_MODELS_DIR / DLICV_DATASET / TRAINED_MODEL_SUBDIR
#: NiChart's normative centile tables (issue 18), under NiChart's file names.
NICHART_NORMS = SHARED_DIR / "reference" / "nichart"
