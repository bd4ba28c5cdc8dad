"""Small normative tables in NiChart's layout, with values chosen so centiles are easy to check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dlmuse_bids.norms import CENTILE_COLUMNS, ROI_LIST_FILE, TABLE_FILES

#: Two ROIs: name -> (MUSE id, the 50th centile at age 40 in mm^3).
ROIS = {"Hippocampus_L": (48, 4000.0), "TotalBrain": (701, 1_200_000.0)}
#: The centiles at age 40 are median x these; each year older multiplies them by (1 - 0.01).
SPREAD = (0.8, 0.9, 1.0, 1.1, 1.2)


def centiles_at(median40: float, age: int) -> list[float]:
    """The five centile values of a synthetic ROI at a whole age."""
    return [median40 * s * (1 - 0.01 * (age - 40)) for s in SPREAD]


def make_norms(folder: Path, ages=range(40, 51), icv_median: float = 1_400_000.0) -> Path:
    """The four tables and the ROI list in ``folder``; CN-ICVNorm's ROI curves are the same
    numbers, and its ICV curve (unscaled, as NiChart's) has ``icv_median`` at 50."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [{"Index": i, "Code": f"MUSE_{i}", "Name": n} for n, (i, _) in ROIS.items()]
    names.append({"Index": 702, "Code": "MUSE_702", "Name": "ICV"})
    pd.DataFrame(names).to_csv(folder / ROI_LIST_FILE, index=False)
    for reference, file_name in TABLE_FILES.items():
        rows = []
        curves = dict(ROIS)
        if reference == "CN-ICVNorm":
            curves["ICV"] = (702, icv_median)
        for name, (_, median) in curves.items():
            scale = 1.05 if reference == "CN-Males" else 0.95 if reference == "CN-Females" else 1
            for age in ages:
                values = [v * scale for v in centiles_at(median, age)]
                rows.append(
                    {
                        "VarName": name,
                        "Age": age,
                        **dict(zip(CENTILE_COLUMNS, values, strict=True)),
                    }
                )
        pd.DataFrame(rows).to_csv(folder / file_name, index=False)
    return folder
