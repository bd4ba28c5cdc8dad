"""``group/dlmuse_report.html``: distributions of key volumes, outliers, QC flags, failures.

Built from the group tables (``group/dlmuse_volumes.tsv`` and ``group/dlmuse_qc.tsv``), so it
shows exactly what the tables hold.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids import report_path
from ..group import GROUP_DIR, roi_columns
from ..labels import ICV_ID
from .figures import centile_band_panels, scatter_panels
from .subject import KEY_VOLUMES, STYLE, relative_url, write_if_changed

#: Modified z-score (Iglewicz and Hoaglin): 0.6745 (x - median) / MAD; |z| above this is an
#: outlier. 0.6745 makes the MAD of normal data comparable to its standard deviation.
ROBUST_Z_LIMIT = 3.5
REPORT_NAME = "dlmuse_report.html"
FIGURES_DIR = "figures"


def robust_z(values: pd.Series) -> pd.Series:
    """Modified z-scores; all 0 when the MAD is 0 (too few or identical values)."""
    values = values.astype(float)
    median = values.median()
    mad = (values - median).abs().median()
    if not mad or math.isnan(mad):
        return pd.Series(0.0, index=values.index)
    return 0.6745 * (values - median) / mad


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype={"run": str})


def _image_name(row: pd.Series) -> str:
    return Path(str(row["source"])).name


def _outliers(ok: pd.DataFrame, columns: dict[int, str]) -> dict[int, list[str]]:
    """Row index -> 'ROI (z = ...)' for every key ROI whose robust z is beyond the limit."""
    found: dict[int, list[str]] = {}
    for roi, label in KEY_VOLUMES:
        z = robust_z(ok[columns[roi]])
        for index, value in z[z.abs() > ROBUST_Z_LIMIT].items():
            found.setdefault(index, []).append(f"{label} (z = {value:+.1f})")
    return found


def _figures(ok, columns, flagged, out_dir: Path) -> list[tuple[str, Path]]:
    figures = []
    strips = [
        {
            "title": label,
            "x": None,
            "y": ok[columns[roi]].astype(float) / 1000.0,
            "flagged": flagged,
            "ylabel": "mL",
        }
        for roi, label in KEY_VOLUMES
    ]
    path = scatter_panels(strips, out_dir / "dlmuse_key_volumes.png", columns=4)
    figures.append(("Key volumes, one point per image (red: flagged)", path))
    icv_tbv = {
        "title": "Total brain against ICV",
        "x": ok[columns[ICV_ID]].astype(float) / 1000.0,
        "y": ok[columns[701]].astype(float) / 1000.0,
        "flagged": flagged,
        "xlabel": "ICV (mL)",
        "ylabel": "total brain (mL)",
    }
    path = scatter_panels([icv_tbv], out_dir / "dlmuse_icv_tbv.png", columns=1)
    figures.append(("Total brain volume against intracranial volume", path))
    age = pd.to_numeric(ok["age"], errors="coerce") if "age" in ok.columns else None
    if age is not None and age.notna().sum() >= 2:
        panels = [
            {
                "title": f"{label} against age",
                "x": age,
                "y": ok[columns[roi]].astype(float) / 1000.0,
                "flagged": flagged,
                "xlabel": "age",
                "ylabel": "mL",
            }
            for roi, label in KEY_VOLUMES[:6]
        ]
        path = scatter_panels(panels, out_dir / "dlmuse_volumes_by_age.png", columns=3)
        figures.append(("Volumes against age (participants.tsv)", path))
    return figures


#: The ROIs drawn against NiChart's centile bands: (MUSE id, label).
CENTILE_ROIS: tuple[tuple[int, str], ...] = tuple(
    (roi, label) for roi, label in KEY_VOLUMES if roi not in (505, 502)
)


def _centile_figure(ok, columns, flagged, norms, group_dir: Path, out_dir: Path):
    """Key volumes against the CN centile bands (everyone's table; the ICV's from CN-ICVNorm),
    one point per image at the age its centiles used; None without centile tables."""
    table = group_dir / "dlmuse_centiles.tsv"
    if norms is None or not table.is_file() or not len(ok):
        return None
    ages = _read(table).set_index("source")["age"]
    age = pd.to_numeric(ok["source"].map(ages), errors="coerce")
    panels = []
    for roi, label in CENTILE_ROIS:
        curves = norms.curves["CN"] if roi != ICV_ID else norms.curves["CN-ICVNorm"]
        if roi not in curves:
            continue
        points = [
            {
                "age": float(age[i]),
                "value": float(ok.at[i, columns[roi]]) / 1000.0,
                "subject": str(ok.at[i, "participant_id"]),
                "flagged": bool(flagged[i]),
            }
            for i in range(len(ok))
            if not math.isnan(age[i])
        ]
        curve = curves[roi]
        panels.append(
            {
                "title": label,
                "ages": curve.ages,
                "bands": curve.values / 1000.0,
                "points": points,
                "ylabel": "mL",
            }  # fmt: skip
        )
    if not panels or not any(p["points"] for p in panels):
        return None
    path = centile_band_panels(panels, out_dir / "dlmuse_centile_bands.png")
    title = (
        "Key volumes against NiChart's centiles of cognitively normal people (CN, both sexes; "
        "bands 5-95th and 25-75th, line 50th; red x: flagged; a subject's sessions joined)"
    )
    return title, path


def write_group_report(output_dir: Path, norms=None) -> Path:
    """Write ``group/dlmuse_report.html`` and its figures from the group tables.

    With ``norms`` (:class:`dlmuse_bids.norms.NormTables`) and ``group/dlmuse_centiles.tsv``,
    the key volumes are also drawn against the normative centile bands.
    """
    output_dir = Path(output_dir)
    group_dir = output_dir / GROUP_DIR
    volumes = _read(group_dir / "dlmuse_volumes.tsv")
    qc = _read(group_dir / "dlmuse_qc.tsv")
    columns = roi_columns()
    ok = volumes[volumes["status"] == "ok"].reset_index(drop=True)
    flags = qc["qc_flags"] if "qc_flags" in qc.columns else pd.Series("", index=qc.index)
    flags_by_source = dict(zip(qc["source"], flags.fillna(""), strict=True))
    outliers = _outliers(ok, columns) if len(ok) else {}
    reasons: dict[int, list[str]] = {}
    for index, row in ok.iterrows():
        qc_flags = str(flags_by_source.get(row["source"], ""))
        if qc_flags:
            reasons.setdefault(index, []).append(f"QC: {qc_flags}")
        reasons.setdefault(index, []).extend(outliers.get(index, []))
    flagged = np.array([bool(reasons.get(i)) for i in range(len(ok))], dtype=bool)
    figures_dir = group_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(ok, columns, flagged, figures_dir) if len(ok) else []
    bands = _centile_figure(ok, columns, flagged, norms, group_dir, figures_dir)
    if bands is not None:
        figures.append(bands)

    def subject_link(row: pd.Series) -> str:
        subject = str(row["participant_id"]).removeprefix("sub-")
        href = relative_url(report_path(output_dir, subject), group_dir) + "#" + _image_name(row)
        return f"<a href='{href}'>{escape(str(row['source']))}</a>"

    flagged_rows = "".join(
        f"<tr><td>{subject_link(ok.loc[i])}</td><td>{escape('; '.join(reasons[i]))}</td></tr>"
        for i in range(len(ok))
        if reasons.get(i)
    )
    failed = volumes[volumes["status"] != "ok"]
    failed_rows = "".join(
        f"<tr><td>{subject_link(row)}</td><td>{escape(str(row['status']))}</td></tr>"
        for _, row in failed.iterrows()
    )
    figure_html = "".join(
        f"<h3>{escape(t)}</h3><img src='{relative_url(p, group_dir)}' alt='{escape(t)}'>"
        for t, p in figures
    )
    tables = "".join(
        f"<li><a href='{name}'>{name}</a></li>"
        for name in sorted(p.name for p in group_dir.iterdir() if p.suffix in (".tsv", ".csv"))
    )
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>dlmuse-bids: group report</title><style>{STYLE}"
        "img { max-width: 100%; }</style></head><body>"
        "<h1>DLMUSE group report</h1>"
        f"<p>{len(volumes)} T1w image(s): {len(ok)} segmented, {len(failed)} failed or "
        "missing.</p>"
        "<h2>Flagged images</h2>"
        "<p class=note>An image is listed when an automatic QC rule fired (see its report for "
        "the reason in words) or when one of its key volumes is an outlier: a robust z-score "
        f"(0.6745 x (volume - median) / MAD, over the segmented images) beyond +/-"
        f"{ROBUST_Z_LIMIT:g}.</p>"
        + (
            f"<table><tr><th>image</th><th>why</th></tr>{flagged_rows}</table>"
            if flagged_rows
            else "<p class=ok>No image flagged.</p>"
        )
        + "<h2>Failed or missing images</h2>"
        + (
            f"<table><tr><th>image</th><th>status</th></tr>{failed_rows}</table>"
            if failed_rows
            else "<p class=ok>None.</p>"
        )
        + f"<h2>Distributions</h2>{figure_html}"
        + f"<h2>Tables</h2><ul>{tables}</ul></body></html>\n"
    )
    path = group_dir / REPORT_NAME
    write_if_changed(path, page.encode("utf-8"))
    return path
