"""The MUSE label table, derived ROIs and ROI volumes.

The table ``dlmuse_bids/data/muse_labels.tsv`` (built by ``tools/make_muse_labels.py`` from
NiChart_DLMUSE's MUSE tables) has one row per label id:

- ``kind == "background"``: label 0.
- ``kind == "single"``: ids that occur in a DLMUSE label map: the 151 MUSE ids the DLMUSE model
  predicts (``nnunet_class`` 1..151) plus label 1, which NiChart writes for intracranial (DLICV)
  voxels outside every DLMUSE region (mostly cortical CSF; no ``nnunet_class``).
- ``kind == "derived"``: composite ROIs (ICV 702, TOTALBRAIN 701, GM 601, WM 604, lobes, ...),
  ``members`` is the space-separated list of single ids they sum.

``volume_order`` (1..260) is the column order of NiChart's ``DLMUSE_Volumes.csv``; it covers the
derived ROIs and 145 of the singles (not 1, 42, 43, 46, 63, 64, 69; label 1 enters as ROI 600).
Volumes follow NiChart's ``CalcROIVol``: voxel count times the voxel volume; derived ROIs are
the sum of their members.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from .atomic import write_bytes_atomic
from .io import nifti_stem

logger = logging.getLogger(__name__)

#: Number of classes the DLMUSE nnU-Net model predicts (background included).
N_NNUNET_CLASSES = 152
#: Label NiChart writes for DLICV voxels outside every DLMUSE region.
RESIDUAL_ICV_LABEL = 1
#: Column prefix of NiChart's volumes CSV.
NICHART_PREFIX = "DL_MUSE_Volume_"
ICV_ID = 702
TOTALBRAIN_ID = 701
GM_ID = 601
WM_ID = 604

_TABLE_DTYPES = {
    "index": "int64",
    "name": "string",
    "full_name": "string",
    "kind": "string",
    "nnunet_class": "Int64",
    "members": "string",
    "volume_order": "Int64",
    "color": "string",
}


@cache
def _table() -> pd.DataFrame:
    source = resources.files("dlmuse_bids") / "data" / "muse_labels.tsv"
    with source.open("r", encoding="utf-8") as fobj:
        table = pd.read_csv(
            fobj, sep="\t", dtype=_TABLE_DTYPES, keep_default_na=False, na_values=[""]
        )
    table["members"] = table["members"].fillna("")
    table["color"] = table["color"].fillna("")
    if not table["index"].is_unique:
        raise RuntimeError("muse_labels.tsv has duplicate label ids")
    return table


def load_label_table() -> pd.DataFrame:
    """Return the MUSE label table.

    Returns
    -------
    pandas.DataFrame
        One row per label id, columns ``index, name, full_name, kind, nnunet_class, members,
        volume_order, color``. A fresh copy of a cached table, safe to modify.
    """
    return _table().copy()


def _members(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split())


@cache
def _volume_members() -> dict[int, tuple[int, ...]]:
    table = _table()
    rows = table[table["volume_order"].notna()].sort_values("volume_order")
    return {
        int(roi): _members(members)
        for roi, members in zip(rows["index"], rows["members"], strict=True)
    }


@cache
def _lut() -> np.ndarray:
    table = _table()
    rows = table[table["nnunet_class"].notna()]
    lut = np.zeros(N_NNUNET_CLASSES, dtype=np.uint8)
    lut[rows["nnunet_class"].to_numpy(dtype=np.int64)] = rows["index"].to_numpy(dtype=np.int64)
    return lut


@cache
def _single_ids() -> tuple[int, ...]:
    table = _table()
    return tuple(sorted(int(x) for x in table.loc[table["kind"] == "single", "index"]))


def class_to_muse_lut() -> np.ndarray:
    """Lookup table from nnU-Net class to MUSE id.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of length 152; ``lut[cls]`` is the MUSE id of class ``cls``
        (class 0, background, maps to 0). Use as ``lut[prediction]``.
    """
    return _lut().copy()


def single_roi_ids() -> list[int]:
    """Sorted ids that can occur in a DLMUSE label map (label 1 included, background not)."""
    return list(_single_ids())


def volume_roi_ids() -> list[int]:
    """The 260 ROI ids of NiChart's volumes table, in its column order."""
    return list(_volume_members())


def volume_roi_members() -> dict[int, tuple[int, ...]]:
    """Single ids summed by each of the 260 volume ROIs, in NiChart's column order."""
    return dict(_volume_members())


def voxel_volume_mm3(zooms: Sequence[float]) -> float:
    """Volume of one voxel in mm³.

    Parameters
    ----------
    zooms : sequence of float
        Voxel sizes in mm, e.g. ``img.header.get_zooms()``; only the first three are used.

    Returns
    -------
    float
        Product of the first three zooms, computed in float64.
    """
    if len(zooms) < 3:
        raise ValueError(f"need at least three zooms, got {tuple(zooms)}")
    x, y, z = (float(v) for v in zooms[:3])
    volume = x * y * z
    if not volume > 0:
        raise ValueError(f"voxel volume must be positive, got zooms {tuple(zooms)}")
    return volume


def _integer_labels(label_map: np.ndarray) -> np.ndarray:
    values = np.asarray(label_map).ravel()
    if values.dtype.kind in "iu":
        return values
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError("label map has non-integer values")
        return values.astype(np.int64)
    raise TypeError(f"label map must be integer or float, got dtype {values.dtype}")


def _format_ids(ids: Iterable[int], limit: int = 20) -> str:
    ids = sorted(ids)
    text = ", ".join(str(v) for v in ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def single_roi_counts(label_map: np.ndarray) -> dict[int, int]:
    """Voxel count of every single ROI (:func:`single_roi_ids` order; zero when absent).

    Raises
    ------
    ValueError
        If the map holds values that are neither background nor a single ROI id.
    """
    singles = _single_ids()
    values = _integer_labels(label_map)
    known = np.zeros(max(singles) + 1, dtype=bool)
    known[[0, *singles]] = True
    if values.size:
        vmin, vmax = int(values.min()), int(values.max())
        if vmin < 0 or vmax >= known.size:
            outside = values[(values < 0) | (values >= known.size)]
            raise ValueError(
                f"label map has unknown label values: {_format_ids(np.unique(outside))}"
            )
    counts = np.bincount(values.astype(np.intp, copy=False), minlength=known.size)
    unknown = np.flatnonzero((counts > 0) & ~known)
    if unknown.size:
        raise ValueError(f"label map has unknown label values: {_format_ids(unknown.tolist())}")
    return {roi: int(counts[roi]) for roi in singles}


def roi_volumes(
    label_map: np.ndarray, zooms: Sequence[float]
) -> tuple[dict[int, float], dict[int, float]]:
    """The volumes (mm³) of a MUSE label map: every single ROI, and NiChart's 260 ROIs.

    The one place volumes are computed (the pipeline, the volumes table and QC call it, the
    table through :func:`volumes_from_counts`).

    Parameters
    ----------
    label_map : numpy.ndarray
        Label map in MUSE ids (0 = background, 1 = ICV not in any region), any shape.
        Float arrays (``get_fdata()``) are accepted when all values are integers.
    zooms : sequence of float
        Voxel size in mm (see :func:`voxel_volume_mm3`).

    Returns
    -------
    tuple of dict[int, float]
        ``{id: voxel count * voxel volume}`` for every id of :func:`single_roi_ids`, in that
        order (zero for ids absent from the map), and :func:`derived_roi_volumes` of those.

    Raises
    ------
    ValueError
        If the map holds values that are neither background nor a single ROI id.
    """
    return volumes_from_counts(single_roi_counts(label_map), zooms)


def volumes_from_counts(
    counts: Mapping[int, int], zooms: Sequence[float]
) -> tuple[dict[int, float], dict[int, float]]:
    """:func:`roi_volumes` from the :func:`single_roi_counts` of a label map."""
    scale = voxel_volume_mm3(zooms)
    single = {roi: n * scale for roi, n in counts.items()}
    return single, derived_roi_volumes(single)


def derived_roi_volumes(single_volumes: Mapping[int, float]) -> dict[int, float]:
    """Volumes of the 260 ROIs of NiChart's table, each the sum of its members.

    Parameters
    ----------
    single_volumes : mapping of int to float
        Single-ROI volumes, e.g. the first of :func:`roi_volumes`.

    Returns
    -------
    dict[int, float]
        ``{roi id: volume}`` in :func:`volume_roi_ids` order (single ROIs in that list are
        their own volume; ROI 600 is label 1).

    Raises
    ------
    ValueError
        If a member id is missing from ``single_volumes``.
    """
    members = _volume_members()
    needed = {m for ids in members.values() for m in ids}
    missing = needed - set(single_volumes)
    if missing:
        raise ValueError(f"single volumes lack ids: {_format_ids(missing)}")
    # fsum: exact sums, independent of member order
    return {roi: math.fsum(float(single_volumes[m]) for m in ids) for roi, ids in members.items()}


_T1_SUFFIX = re.compile(r"_T1w?$", re.IGNORECASE)


def nichart_mrid(path: str | os.PathLike[str]) -> str:
    """NiChart's MRID: the file name without extension and without a trailing ``_T1w``/``_T1``.

    Never NiChart's own common-suffix stripping, which turns ``sub-01_T1w`` into ``sub-0``.
    """
    return _T1_SUFFIX.sub("", nifti_stem(path))


def nichart_columns() -> list[str]:
    """Header of NiChart's volumes CSV: ``MRID`` then ``DL_MUSE_Volume_<id>`` for 260 ids."""
    return ["MRID", *(f"{NICHART_PREFIX}{roi}" for roi in _volume_members())]


def nichart_volumes_row(mrid: str, volumes: Mapping[int, float]) -> dict[str, Any]:
    """One row of NiChart's volumes table.

    Parameters
    ----------
    mrid : str
        Subject/session identifier written to the ``MRID`` column.
    volumes : mapping of int to float
        Volumes of (at least) the 260 ROIs, e.g. from :func:`derived_roi_volumes`.

    Returns
    -------
    dict
        ``{"MRID": mrid, "DL_MUSE_Volume_<id>": volume, ...}`` in NiChart's column order.
    """
    order = _volume_members()
    missing = set(order) - set(volumes)
    if missing:
        raise ValueError(f"volumes lack ROI ids: {_format_ids(missing)}")
    row: dict[str, Any] = {"MRID": mrid}
    row.update({f"{NICHART_PREFIX}{roi}": float(volumes[roi]) for roi in order})
    return row


def write_nichart_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows of :func:`nichart_volumes_row` as a CSV in NiChart's layout.

    The file is written to a temporary file in the target folder and moved into place with
    :func:`os.replace`, so readers never see a partial file.

    Parameters
    ----------
    rows : iterable of mappings
        Rows with exactly the keys of :func:`nichart_columns`.
    path : str or os.PathLike
        Output CSV path.
    """
    columns = nichart_columns()
    rows = list(rows)
    for i, row in enumerate(rows):
        if set(row) != set(columns):
            extra, lacking = set(row) - set(columns), set(columns) - set(row)
            raise ValueError(f"row {i}: unexpected columns {extra}, missing {lacking}")
    frame = pd.DataFrame(rows, columns=columns)
    write_bytes_atomic(path, frame.to_csv(index=False).encode("utf-8"))
    logger.debug("wrote %d volume rows to %s", len(rows), path)


def roi_volume_table(label_map: np.ndarray, zooms: Sequence[float]) -> pd.DataFrame:
    """Volumes of every single and derived ROI of a MUSE label map, one row per ROI.

    Returns
    -------
    pandas.DataFrame
        Columns ``index, name, volume_mm3, n_voxels``: the single ROIs (label 1 included) by
        id, then the derived ROIs in NiChart's order; ``n_voxels`` is missing (``<NA>``) for
        derived ROIs, which are sums of their members' volumes.
    """
    counts = single_roi_counts(label_map)
    single, derived = volumes_from_counts(counts, zooms)
    table = _table().set_index("index")
    ids = list(single) + [roi for roi in derived if table.at[roi, "kind"] == "derived"]
    return pd.DataFrame(
        {
            "index": ids,
            "name": [table.at[roi, "name"] for roi in ids],
            "volume_mm3": [single[roi] if roi in single else derived[roi] for roi in ids],
            "n_voxels": pd.array([counts.get(roi, pd.NA) for roi in ids], dtype="Int64"),
        }
    )


def dseg_table() -> pd.DataFrame:
    """BIDS ``dseg.tsv`` of DLMUSE label maps: every value that can occur, background included.

    Columns ``index, name, abbreviation, color`` (name: the full name; abbreviation: the short
    name used as a column name in the group tables).
    """
    table = _table()
    rows = table[table["kind"].isin(["background", "single"])].sort_values("index")
    return pd.DataFrame(
        {
            "index": rows["index"].to_numpy(),
            "name": rows["full_name"].to_numpy(),
            "abbreviation": rows["name"].to_numpy(),
            "color": rows["color"].to_numpy(),
        }
    )
