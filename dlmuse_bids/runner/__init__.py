"""Plan, run and report a batch of T1w images: one implementation for every entry point.

``dlmuse run`` (:func:`run_nifti`: NiChart_DLMUSE's layout, computed in this process) and
``dlmuse-bids participant`` (:func:`run_participant`: BIDS-Derivatives through the nipype
workflow; the brainlife App runs it too) share the plan (what to run, what to skip because its
outputs exist with the same provenance, what to refuse because two images would write the same
files), the outcomes and the summary (:mod:`.core`). Settings come in resolved and frozen
(:mod:`dlmuse_bids.settings`); what the user must hear during a run goes to ``say``; nothing here
reads the environment or prints.
"""

from .bids_app import list_participants, run_group, run_participant, select_t1w
from .core import (
    RUN_ERRORS,
    Outcome,
    OutputError,
    Plan,
    RunReport,
    Stopped,
    StopRequest,
    plan_images,
    precision_label,
    provenance,
)
from .nifti import nifti_outputs, predict_image, run_nifti

__all__ = [
    "RUN_ERRORS",
    "Outcome",
    "OutputError",
    "Plan",
    "RunReport",
    "StopRequest",
    "Stopped",
    "list_participants",
    "nifti_outputs",
    "plan_images",
    "precision_label",
    "predict_image",
    "provenance",
    "run_group",
    "run_nifti",
    "run_participant",
    "select_t1w",
]
