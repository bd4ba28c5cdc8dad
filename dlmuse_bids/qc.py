"""Automatic quality measures of one DLMUSE segmentation, and the rules that flag it.

Every threshold lives in :data:`RULES`, with the reason for it. The measures need only the label
map (MUSE ids), the ICV mask and what the pipeline recorded, so they can be recomputed from the
outputs of any run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from .labels import (
    GM_ID,
    ICV_ID,
    RESIDUAL_ICV_LABEL,
    TOTALBRAIN_ID,
    load_label_table,
    roi_volumes,
    volume_roi_ids,
)


@dataclass(frozen=True)
class Rule:
    """A QC flag: its name, the measure it reads, the bounds outside which it fires, and why."""

    flag: str
    measure: str
    low: float | None
    high: float | None
    reason: str

    def fires(self, value: Any) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        )


#: A region smaller than this (mm3) counts as missing; the smallest DLMUSE regions are ~100 mm3.
MIN_ROI_MM3 = 10.0
#: Only pairs whose mean volume is at least this (mm3) count for asymmetry (small regions are
#: noisy).
ASYMMETRY_MIN_MM3 = 1000.0
#: DLICV component-selection outcomes that need no flag.
GOOD_COMPONENT_OUTCOMES = ("single", "largest-roundest")

#: The rules, in the order flags are listed. Bounds are wide on purpose: they catch failures
#: (a wrong mask, a lost hemisphere, a mis-scaled header), not normal anatomical variation.
RULES: tuple[Rule, ...] = (
    Rule(
        "icv-out-of-range",
        "icv_l",
        0.9,
        2.3,
        "adult intracranial volumes lie between about 1.1 and 1.9 L; outside 0.9-2.3 L the ICV "
        "mask or the voxel size in the header is almost certainly wrong",
    ),
    Rule(
        "brain-icv-ratio",
        "brain_icv_ratio",
        0.5,
        0.95,
        "total brain is 65-90 % of ICV from young adults to old age; below 50 % or above 95 % the "
        "brain or the ICV segmentation failed",
    ),
    Rule(
        "much-unlabelled-icv",
        "residual_icv_fraction",
        None,
        0.35,
        "label 1 (ICV outside every region, mostly cortical CSF) is usually 10-25 % of ICV; "
        "over 35 % means DLMUSE left large parts of the brain unlabelled",
    ),
    Rule(
        "missing-rois",
        "n_missing_rois",
        None,
        0,
        "every one of the 145 regions of the MUSE volume table exists in every brain; one under "
        f"{MIN_ROI_MM3:g} mm3 is missing (a lesion, a cropped field of view or a failure)",
    ),
    Rule(
        "asymmetry",
        "max_asymmetry",
        None,
        0.75,
        "left and right volumes of paired regions over 1 mL differ by up to about 45 % in "
        "healthy brains (small gyri, ventricles); over 75 % suggests a lost hemisphere or a "
        "cropped field of view",
    ),
    Rule(
        "icv-component-rule",
        "icv_component_ok",
        1,
        None,
        "DLICV's mask should have one large component (or a clear choice between them); "
        "anything else means the intracranial mask is fragmented, empty or ambiguous",
    ),
    Rule(
        "template-rotation",
        "template_rotation_deg",
        None,
        30.0,
        "the models were trained on heads turned by at most 30 degrees from the standard (LPS) "
        "pose; a head that needs a larger rotation to meet the MNI template has a wrong "
        "orientation in its header (swapped or flipped axes), and its labels cannot be trusted",
    ),
    Rule(
        "etiv-mismatch",
        "icv_etiv_ratio",
        0.85,
        1.15,
        "the template alignment's scale gives an ICV estimate independent of DLICV (an eTIV); "
        "when the two disagree by more than 15 % the ICV mask is too small or too large, or the "
        "alignment failed",
    ),
    Rule(
        "template-misfit",
        "template_ncc",
        0.5,
        None,
        "after the best affine alignment the masked scan should correlate with the masked "
        "template (0.85-0.95 on real scans); below 0.5 it does not look like a brain there, so "
        "the ICV mask or the image is wrong and the template measures mean nothing",
    ),
    Rule(
        "coarse-voxels",
        "max_voxel_mm",
        None,
        2.0,
        "the models work at 1 mm; beyond 2 mm the smallest regions (accumbens, amygdala) are a "
        "handful of voxels",
    ),
)


@cache
def paired_rois() -> tuple[tuple[int, int, str], ...]:
    """(left id, right id, name without side) of every single ROI that has a mirror ROI."""
    table = load_label_table()
    singles = table[table["kind"] == "single"]
    by_name = dict(zip(singles["name"], singles["index"], strict=True))
    pairs = []
    for name, right in by_name.items():
        if not re.search(r"(^|_)right(_|$)", name):
            continue
        left_name = re.sub(r"(^|_)right(_|$)", r"\1left\2", name)
        if left_name in by_name:
            side_free = re.sub(r"(^|_)right(_|$)", r"\1", name).strip("_")
            pairs.append((int(by_name[left_name]), int(right), side_free))
    return tuple(sorted(pairs))


def measures(
    labels: np.ndarray,
    zooms: tuple[float, float, float],
    *,
    component_outcome: str | None = None,
    orientation: str | None = None,
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The QC measures of one label map (MUSE ids, any orientation).

    ``template`` holds the template alignment (:func:`template_measures`), or a ``"skipped"``
    reason, or is ``None`` when no check was run.
    """
    single, volumes = roi_volumes(labels, zooms)
    icv = volumes[ICV_ID]
    expected = [roi for roi in volume_roi_ids() if roi in single and roi != RESIDUAL_ICV_LABEL]
    missing = sorted(roi for roi in expected if single[roi] < MIN_ROI_MM3)
    asym = []
    for left, right, name in paired_rois():
        a, b = single[left], single[right]
        if (a + b) / 2 >= ASYMMETRY_MIN_MM3:
            asym.append((abs(a - b) / ((a + b) / 2), name))
    asym.sort(reverse=True)
    ratio = volumes[TOTALBRAIN_ID] / icv if icv > 0 else float("nan")
    return {
        "icv_l": icv / 1e6,
        "brain_icv_ratio": ratio,
        "gm_icv_ratio": volumes[GM_ID] / icv if icv > 0 else float("nan"),
        "residual_icv_fraction": single[RESIDUAL_ICV_LABEL] / icv if icv > 0 else float("nan"),
        "n_missing_rois": len(missing),
        "missing_rois": " ".join(str(r) for r in missing),
        "max_asymmetry": asym[0][0] if asym else float("nan"),
        "worst_asymmetric_pairs": " ".join(f"{n}:{v:.2f}" for v, n in asym[:3]),
        "icv_component_outcome": component_outcome or "n/a",
        "icv_component_ok": (
            None
            if component_outcome is None
            else int(component_outcome in GOOD_COMPONENT_OUTCOMES)
        ),
        "voxel_mm": "x".join(f"{z:.3g}" for z in zooms),
        "max_voxel_mm": float(max(zooms)),
        "orientation": orientation or "n/a",
        **template_columns(template, icv / 1e6),
    }


def template_measures(
    name: str, rotation_deg: float, scale: float, ncc: float, etiv_l: float
) -> dict[str, Any]:
    """What the QC table keeps of a template alignment (see :mod:`dlmuse_bids.template`).

    Rounded to 9 decimals: far below what the measures can tell, and above the last-bit
    differences of another libm or BLAS, so the table is the same in the container and on the
    host.
    """
    return {
        "template": name,
        "template_rotation_deg": round(float(rotation_deg), 9),
        "template_scale": round(float(scale), 9),
        "template_ncc": round(float(ncc), 9),
        "etiv_l": round(float(etiv_l), 9),
    }


def template_columns(template: Mapping[str, Any] | None, icv_l: float) -> dict[str, Any]:
    """The QC table's template-check columns: the alignment's measures, or why it was skipped.

    ``icv_l`` (the DLICV volume, litres) is compared with the template's eTIV estimate.
    """
    nan = float("nan")
    if not template or "skipped" in template:
        reason = (template or {}).get("skipped", "not run")
        return {
            "template_check": f"skipped: {reason}",
            "template_rotation_deg": nan,
            "template_scale": nan,
            "template_ncc": nan,
            "etiv_l": nan,
            "icv_etiv_ratio": nan,
        }
    etiv = float(template["etiv_l"])
    return {
        "template_check": str(template["template"]),
        "template_rotation_deg": float(template["template_rotation_deg"]),
        "template_scale": float(template["template_scale"]),
        "template_ncc": float(template["template_ncc"]),
        "etiv_l": etiv,
        "icv_etiv_ratio": icv_l / etiv if etiv > 0 else nan,
    }


def flags(values: Mapping[str, Any]) -> list[str]:
    """Names of the rules that fire on a row of :func:`measures`."""
    return [rule.flag for rule in RULES if rule.fires(values.get(rule.measure))]


def qc_row(labels: np.ndarray, zooms, **context: Any) -> dict[str, Any]:
    """Measures plus a ``qc_flags`` column (space-separated flag names, empty when clean)."""
    row = measures(labels, zooms, **context)
    row["qc_flags"] = " ".join(flags(row))
    return row


def explain(flag: str) -> str:
    """The plain-words reason of a flag, for reports."""
    for rule in RULES:
        if rule.flag == flag:
            return rule.reason
    raise KeyError(flag)
