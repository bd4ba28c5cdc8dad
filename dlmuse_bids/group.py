"""Group-level tables from participant outputs (never segments anything).

One row per T1w the participant level was asked to segment: its ROI volumes when its outputs
are there, its status otherwise (``failed`` when a crash file names it, ``missing`` when it was
never run), so no image silently drops out of an analysis.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_bytes_atomic
from .bids import LOGS_DIR, centile_paths, crash_log_glob, output_paths, source_entities
from .labels import (
    ICV_ID,
    load_label_table,
    nichart_columns,
    nichart_mrid,
    nichart_volumes_row,
)
from .locks import holder

logger = logging.getLogger(__name__)

GROUP_DIR = "group"
ID_COLUMNS = [
    "participant_id",
    "session_id",
    "acq",
    "ce",
    "rec",
    "run",
    "source",
    "status",
    "software_version",
    "inference_mode",
]
_ENTITY_COLUMNS = {"acq": "acquisition", "ce": "ceagent", "rec": "reconstruction", "run": "run"}


def roi_columns() -> dict[int, str]:
    """ROI id -> column name (the label table's short name), singles then derived."""
    return dict(_roi_columns())


@cache
def _roi_columns() -> tuple[tuple[int, str], ...]:
    table = load_label_table()
    rows = table[table["kind"] != "background"]
    ordered = pd.concat(
        [
            rows[rows["kind"] == "single"].sort_values("index"),
            rows[rows["kind"] == "derived"].sort_values("volume_order"),
        ]
    )
    return tuple((int(i), str(n)) for i, n in zip(ordered["index"], ordered["name"], strict=True))


def image_status(source: Path, output_dir: Path) -> str:
    """``ok`` (outputs written), ``failed`` (a crash file in logs/) or ``missing``.

    An image a participant run is segmenting now (it holds the image's lock,
    :mod:`dlmuse_bids.locks`) is ``missing``, whatever its files: they may be half old, half
    new, and an earlier crash file is not this run's. A later group run picks it up.
    """
    logs = Path(output_dir) / LOGS_DIR
    paths = output_paths(source, output_dir)
    if holder(output_dir, paths["dseg"].name) is not None:
        return "missing"
    if paths["volumes"].is_file() and paths["dseg_json"].is_file():
        return "ok"
    if logs.is_dir() and any(logs.glob(crash_log_glob(source))):
        return "failed"
    return "missing"


def _id_row(source: Path, bids_dir: Path, output_dir: Path) -> dict:
    """The identifying columns of one T1w and its status."""
    ent = source_entities(source)
    row: dict = {
        "participant_id": f"sub-{ent['subject']}",
        "session_id": f"ses-{ent['session']}" if ent.get("session") else None,
        **{col: ent.get(name) for col, name in _ENTITY_COLUMNS.items()},
        "source": Path(source).absolute().relative_to(Path(bids_dir).absolute()).as_posix(),
        "status": image_status(source, output_dir),
    }
    if row["run"] is not None:
        row["run"] = str(row["run"])
    return row


def collect_qc(t1w_files: Sequence[Path], bids_dir: Path, output_dir: Path) -> pd.DataFrame:
    """Every image's QC row (see :mod:`dlmuse_bids.qc`) after its id columns and status."""
    rows = []
    for source in t1w_files:
        row = _id_row(source, bids_dir, output_dir)
        qc_file = output_paths(source, output_dir)["qc"]
        if row["status"] == "ok" and qc_file.is_file():
            qc_row = pd.read_csv(qc_file, sep="\t", na_values="n/a", keep_default_na=False)
            row.update(qc_row.iloc[0].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def collect_volumes(
    t1w_files: Sequence[Path], bids_dir: Path, output_dir: Path
) -> tuple[pd.DataFrame, list[dict]]:
    """The group table (id columns, then one column per ROI) and NiChart rows of the ok images."""
    columns = roi_columns()
    rows, nichart_rows = [], []
    for source in t1w_files:
        row = _id_row(source, bids_dir, output_dir)
        if row["status"] == "ok":
            paths = output_paths(source, output_dir)
            table = pd.read_csv(paths["volumes"], sep="\t", na_values="n/a")
            volumes = dict(zip(table["index"].astype(int), table["volume_mm3"], strict=True))
            sidecar = json.loads(paths["dseg_json"].read_text(encoding="utf-8"))
            row["software_version"] = sidecar.get("SoftwareVersion")
            row["inference_mode"] = sidecar.get("InferenceMode")
            row.update({name: volumes.get(roi, np.nan) for roi, name in columns.items()})
            nichart_rows.append(nichart_volumes_row(nichart_mrid(source), volumes))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*ID_COLUMNS, *columns.values()])
    return frame, nichart_rows


#: Columns of the centile tables between the id columns and the ROIs (from each image's sidecar).
CENTILE_INFO = {"age": "Age", "sex": "Sex", "flags": "Flags"}


#: The group centile tables: file stem -> the column of the per-image tables they hold.
CENTILE_TABLES = {"dlmuse_centiles": "centile", "dlmuse_centiles_icvnorm": "icvnorm_centile"}


def collect_centiles(
    t1w_files: Sequence[Path], bids_dir: Path, output_dir: Path
) -> dict[str, pd.DataFrame] | None:
    """For each of :data:`CENTILE_TABLES`, one row per image (id columns, age, sex, flags,
    reference) and one column per ROI: that column of its centile table. Each image's table is
    read once; None when no image has one."""
    columns = roi_columns()
    rows: dict[str, list[dict]] = {stem: [] for stem in CENTILE_TABLES}
    found = False
    for source in t1w_files:
        row = _id_row(source, bids_dir, output_dir)
        paths = centile_paths(source, output_dir)
        try:
            table = pd.read_csv(paths["centiles"], sep="\t", dtype=str, keep_default_na=False)
            sidecar = json.loads(paths["centiles_json"].read_text(encoding="utf-8"))
        except (OSError, ValueError, pd.errors.ParserError):
            table = None  # none, or not a complete pair: no centiles for this image
        cells: dict[str, dict] = {stem: {} for stem in CENTILE_TABLES}
        if row["status"] == "ok" and table is not None and isinstance(sidecar, dict):
            found = True
            row.update({key: sidecar.get(field) for key, field in CENTILE_INFO.items()})
            row["flags"] = " ".join(row["flags"] or [])
            refs = sorted(set(table["reference"]) - {"CN-ICVNorm"})
            row["reference"] = refs[0] if len(refs) == 1 else " ".join(refs)
            ids = table["index"].astype(int)
            for stem, column in CENTILE_TABLES.items():
                by_id = dict(zip(ids, table[column], strict=True))
                cells[stem] = {name: by_id[roi] for roi, name in columns.items() if roi in by_id}
        for stem in CENTILE_TABLES:
            rows[stem].append({**row, **cells[stem]})
    if not found:
        return None
    head = [*ID_COLUMNS[:8], *CENTILE_INFO, "reference"]
    out = {}
    for stem, image_rows in rows.items():
        frame = pd.DataFrame(image_rows)
        rois = [name for name in columns.values() if name in frame.columns]
        out[stem] = frame.reindex(columns=[*head, *rois])
    return out


def merge_participants(frame: pd.DataFrame, bids_dir: Path) -> pd.DataFrame:
    """Add the columns of the raw dataset's ``participants.tsv`` (age, sex, ...)."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return frame
    extra = pd.read_csv(path, sep="\t", dtype=str, na_values="n/a", keep_default_na=False)
    if "participant_id" not in extra.columns:
        logger.warning("%s has no participant_id column; not merged", path)
        return frame
    extra = extra.drop_duplicates("participant_id")
    keep = [c for c in extra.columns if c == "participant_id" or c not in frame.columns]
    merged = frame.merge(extra[keep], on="participant_id", how="left")
    first = [*ID_COLUMNS, *[c for c in keep if c != "participant_id"]]
    return merged[first + [c for c in merged.columns if c not in first]]


def icv_normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """ROI volumes as a fraction of the same image's ICV."""
    names = roi_columns()
    columns = list(names.values())
    out = frame.copy()
    icv = out[names[ICV_ID]].astype(float)
    out[columns] = out[columns].astype(float).div(icv.where(icv > 0), axis=0)
    return out


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ROI over the ok images: n, mean, sd, median, IQR (and its quartiles)."""
    ok = frame[frame["status"] == "ok"]
    rows = []
    for name in roi_columns().values():
        values = ok[name].astype(float).dropna()
        q1, median, q3 = (values.quantile(q) for q in (0.25, 0.5, 0.75))
        rows.append(
            {
                "roi": name,
                "n": len(values),
                "mean": values.mean(),
                "sd": values.std(ddof=1),
                "median": median,
                "q1": q1,
                "q3": q3,
                "iqr": q3 - q1,
            }
        )
    return pd.DataFrame(rows)


def _tsv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n").encode()


def write_group_tables(
    t1w_files: Sequence[Path], bids_dir: Path, output_dir: Path
) -> pd.DataFrame:
    """Write the group tables under ``output_dir/group``; return the volumes table."""
    frame, nichart_rows = collect_volumes(t1w_files, bids_dir, output_dir)
    frame = merge_participants(frame, bids_dir)
    out = Path(output_dir) / GROUP_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "dlmuse_volumes.tsv", _tsv(frame))
    write_bytes_atomic(out / "dlmuse_volumes_icvnorm.tsv", _tsv(icv_normalised(frame)))
    write_bytes_atomic(out / "dlmuse_volumes_summary.tsv", _tsv(summary(frame)))
    write_bytes_atomic(out / "dlmuse_qc.tsv", _tsv(collect_qc(t1w_files, bids_dir, output_dir)))
    for stem, centiles in (collect_centiles(t1w_files, bids_dir, output_dir) or {}).items():
        write_bytes_atomic(out / f"{stem}.tsv", _tsv(centiles))
    nichart = pd.DataFrame(nichart_rows, columns=nichart_columns())
    write_bytes_atomic(out / "DLMUSE_Volumes.csv", nichart.to_csv(index=False).encode())
    return frame
