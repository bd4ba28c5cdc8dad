"""``sub-<label>.html``: one section per T1w of a subject, read back from the outputs."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from ..atomic import write_bytes_atomic
from ..bids import (
    LOGS_DIR,
    centile_paths,
    crash_log_glob,
    figure_paths,
    output_paths,
    report_path,
)
from ..group import image_status
from ..labels import ICV_ID
from ..qc import explain
from .figures import mosaic

logger = logging.getLogger(__name__)

#: Volumes shown in the report: (MUSE id, label). Lobes are the bilateral GM+WM composites.
KEY_VOLUMES: tuple[tuple[int, str], ...] = (
    (ICV_ID, "Intracranial volume (ICV)"),
    (701, "Total brain"),
    (601, "Grey matter"),
    (604, "White matter"),
    (509, "Ventricles"),
    (48, "Left hippocampus"),
    (47, "Right hippocampus"),
    (504, "Frontal lobe"),
    (507, "Parietal lobe"),
    (508, "Temporal lobe"),
    (506, "Occipital lobe"),
    (505, "Limbic lobe"),
    (502, "Cerebellum"),
)

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin-top: 1.2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { color: #a30000; } .ok { color: #176617; } .note { color: #666; font-size: 0.9em; }
img.mosaic { width: 100%; max-width: 1100px; background: #000; }
code { font-size: 0.9em; }
"""


def relative_url(path: Path, base: Path) -> str:
    """A relative URL from the report's folder to ``path`` (each part quoted)."""
    from urllib.parse import quote

    rel = os.path.relpath(path, base)
    return "/".join(quote(part) for part in Path(rel).parts)


def _number(value: Any, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return escape(str(value))
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _read_row(path: Path) -> dict[str, Any]:
    frame = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
    return frame.iloc[0].to_dict() if len(frame) else {}


def _volumes_table(volumes_file: Path) -> str:
    table = pd.read_csv(volumes_file, sep="\t", na_values="n/a")
    volumes = dict(zip(table["index"].astype(int), table["volume_mm3"], strict=True))
    icv = float(volumes.get(ICV_ID, float("nan")))
    rows = []
    for roi, label in KEY_VOLUMES:
        mm3 = float(volumes.get(roi, float("nan")))
        share = 100.0 * mm3 / icv if icv > 0 else float("nan")
        rows.append(
            f"<tr><td>{escape(label)}</td><td class=num>{roi}</td>"
            f"<td class=num>{_number(mm3 / 1000.0, 1)}</td>"
            f"<td class=num>{_number(share, 1)}</td></tr>"
        )
    return (
        "<table><tr><th>region</th><th>MUSE id</th><th>volume (mL)</th><th>% of ICV</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _flags_block(qc: Mapping[str, Any]) -> str:
    flags = str(qc.get("qc_flags") or "").split()
    items = [
        f"<li class=flag><b>{escape(flag)}</b>: {escape(explain(flag))}</li>" for flag in flags
    ]
    summary = (
        "<p class=ok>No automatic QC flag fired.</p>"
        if not flags
        else f"<p class=flag>{len(flags)} QC flag(s) fired:</p><ul>{''.join(items)}</ul>"
    )
    template = str(qc.get("template_check", "n/a"))
    if template.startswith("skipped"):
        check = f"Template check {escape(template)}."
    else:
        check = (
            f"Template check against {escape(template)}: rotation "
            f"{_number(qc.get('template_rotation_deg'), 1)} degrees, scale "
            f"{_number(qc.get('template_scale'), 3)}, eTIV {_number(qc.get('etiv_l'))} L "
            f"(ICV/eTIV {_number(qc.get('icv_etiv_ratio'))}), fit (NCC) "
            f"{_number(qc.get('template_ncc'))}."
        )
    measures = (
        f"ICV {_number(qc.get('icv_l'))} L; brain/ICV {_number(qc.get('brain_icv_ratio'))}; "
        f"unlabelled ICV {_number(100 * float(qc.get('residual_icv_fraction', 'nan')), 1)} %; "
        f"missing regions {escape(str(qc.get('n_missing_rois', 'n/a')))}; worst asymmetry "
        f"{escape(str(qc.get('worst_asymmetric_pairs', '') or 'n/a'))}; voxel "
        f"{escape(str(qc.get('voxel_mm', 'n/a')))} mm, {escape(str(qc.get('orientation', '')))}"
    )
    return f"{summary}<p class=note>{measures}. {check}</p>"


_WHO = {"M": "men", "F": "women"}


def _centile_bar(text: str) -> str:
    """A small inline band plot: 0-100 with the 5-95 and 25-75 bands and the image's centile."""
    outside = text in ("<5", ">95")
    value = 0.0 if text == "<5" else 100.0 if text == ">95" else float(text)
    x = 2 + value * 1.16
    colour = "#a30000" if outside else "#222"
    return (
        "<svg class=bar width=120 height=12 viewBox='0 0 120 12' role=img "
        f"aria-label='centile {escape(text)}'><rect x=2 y=3 width=116 height=6 fill=#eee />"
        "<rect x=7.8 y=3 width=104.4 height=6 fill=#c6dbef /><rect x=31 y=3 width=58 height=6 "
        f"fill=#9ecae1 /><line x1=60 x2=60 y1=2 y2=10 stroke=#3182bd /><circle cx={x:.1f} cy=6 "
        f"r=3.2 fill={colour} /></svg>"
    )


def _centile_words(text: str, beyond: str, who: str) -> str:
    if text == "<5":
        return f"smaller than 95 % of {who}: {float(beyond):+.2f} x the 5-95 spread below the 5th"
    if text == ">95":
        return f"larger than 95 % of {who}: {float(beyond):+.2f} x the 5-95 spread above the 95th"
    return f"larger than {float(text):.0f} % of {who}"


def _centiles_block(paths: Mapping[str, Path]) -> str:
    """The key ROIs' normative centiles in words and as small band plots, with a flag for those
    outside the 5-95 range (information, not failure)."""
    if not paths["centiles"].is_file():
        return (
            "<p class=note>No normative centiles: the image has no age in participants.tsv or "
            "sessions.tsv, or NiChart's tables were not available to the run.</p>"
        )
    table = pd.read_csv(paths["centiles"], sep="\t", dtype=str, keep_default_na=False)
    meta = json.loads(paths["centiles_json"].read_text(encoding="utf-8"))
    rows_by_id = {int(r["index"]): r for _, r in table.iterrows()}
    age = meta.get("Age")
    who_sex = _WHO.get(meta.get("Sex"), "people")
    rows, outside = [], []
    for roi, label in KEY_VOLUMES:
        row = rows_by_id.get(roi)
        if row is None or row["centile"] == "n/a":
            continue
        who = f"cognitively normal {'people' if row['reference'] == 'CN-ICVNorm' else who_sex}"
        words = _centile_words(row["centile"], row["centile_beyond"], f"{who} aged {age:g}")
        if row["centile"] in ("<5", ">95"):
            outside.append(label)
        rows.append(
            f"<tr><td>{escape(label)}</td><td class=num>{escape(row['centile'])}</td>"
            f"<td>{_centile_bar(row['centile'])}</td><td>{escape(words)}</td>"
            f"<td class=num>{escape(row['icvnorm_centile'])}</td></tr>"
        )
    flag = (
        f"<p class=flag><b>outside-norms</b>: {escape(', '.join(outside))} outside the 5th-95th "
        "centiles of cognitively normal people (information, not a failure)</p>"
        if outside
        else "<p class=ok>Every key region lies within the 5th-95th centiles.</p>"
    )
    edge = (
        f"<p class=flag>Age {age:g} is outside the norms' {meta['NormativeAgeRange'][0]:g}-"
        f"{meta['NormativeAgeRange'][1]:g}: centiles at the nearest edge.</p>"
        if "age-outside-norms" in (meta.get("Flags") or [])
        else ""
    )
    reference = sorted(set(table["reference"]) - {"CN-ICVNorm"})
    return (
        f"{flag}{edge}<table><tr><th>region</th><th>centile</th><th>5 / 25-75 / 95</th>"
        "<th>in words</th><th>ICV-normalised centile</th></tr>" + "".join(rows) + "</table>"
        f"<p class=note>Against NiChart's {escape(', '.join(reference))} table (age {age:g}; "
        "the ICV against CN-ICVNorm), linear between neighbouring years and centiles.</p>"
    )


def _provenance_block(sidecar: Mapping[str, Any]) -> str:
    models = sidecar.get("Models") or {}
    rows = [
        ("software", f"dlmuse-bids {sidecar.get('SoftwareVersion', 'n/a')}"),
        ("device", sidecar.get("Device", "n/a")),
        ("inference mode", sidecar.get("InferenceMode", "n/a")),
    ]
    for name, how in (sidecar.get("Inference") or {}).items():
        tta = "mirroring (8x)" if how.get("TestTimeAugmentation") else "no test-time augmentation"
        step = how.get("TileStepSize", "n/a")
        rows.append(
            (f"{name} inference", f"{how.get('Precision', 'n/a')}; {tta}; tile step {step}")
        )
    seconds = sidecar.get("InferenceSeconds") or {}
    if seconds:
        rows.append(("time taken", ", ".join(f"{k} {float(v):.1f} s" for k, v in seconds.items())))
    for name, info in models.items():
        digests = ", ".join(
            f"{fold} sha256 {d}" for fold, d in info.get("CheckpointSHA256", {}).items()
        )
        rows.append((f"{name} model", f"{info.get('Dataset', '')}: {digests}"))
    cells = "".join(
        f"<tr><th>{escape(k)}</th><td><code>{escape(str(v))}</code></td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _section(source: Path, output_dir: Path, bids_dir: Path, *, draw: bool) -> str:
    rel = Path(source).absolute().relative_to(Path(bids_dir).absolute()).as_posix()
    title = f"<h2 id='{escape(Path(rel).name)}'>{escape(rel)}</h2>"
    status = image_status(source, output_dir)
    if status != "ok":
        crashes = sorted((Path(output_dir) / LOGS_DIR).glob(crash_log_glob(source)))
        links = "".join(
            f"<li><a href='{relative_url(c, output_dir)}'>{escape(c.name)}</a></li>"
            for c in crashes
        )
        what = "failed" if status == "failed" else "has no outputs yet"
        return f"{title}<p class=flag>This image {what}.</p><ul>{links}</ul>"
    paths = output_paths(source, output_dir)
    figure = figure_paths(source, output_dir)["mosaic"]
    sidecar = json.loads(paths["dseg_json"].read_text(encoding="utf-8"))
    if draw or not figure.is_file() or figure.stat().st_mtime < paths["dseg"].stat().st_mtime:
        figure.parent.mkdir(parents=True, exist_ok=True)
        t1w = nib.load(source)
        if len(t1w.shape) == 4:  # the volume that was segmented (single-volume or chosen)
            t1w = t1w.slicer[..., (sidecar.get("SourceGeometry") or {}).get("Volume", 0)]
        mosaic(t1w, nib.load(paths["dseg"]), nib.load(paths["mask"]), figure)
    qc = _read_row(paths["qc"])
    centiles = centile_paths(source, output_dir)
    outputs = [p for p in [*paths.values(), *centiles.values()] if p.is_file()]
    links = "".join(
        f"<li><a href='{relative_url(p, output_dir)}'>{escape(p.name)}</a></li>" for p in outputs
    )
    return (
        f"{title}<h3>Segmentation</h3>"
        f"<img class=mosaic src='{relative_url(figure, output_dir)}' alt='DLMUSE labels and ICV "
        f"contour on {escape(Path(rel).name)}'>"
        "<p class=note>DLMUSE labels (colours of seg-DLMUSE_dseg.tsv) over the T1w; yellow: "
        "the ICV mask's outline. Left of the subject on the left.</p>"
        f"<h3>Quality control</h3>{_flags_block(qc)}"
        f"<h3>Key volumes</h3>{_volumes_table(paths['volumes'])}"
        f"<h3>Normative centiles</h3>{_centiles_block(centiles)}"
        f"<h3>Provenance</h3>{_provenance_block(sidecar)}"
        f"<h3>Files</h3><ul>{links}</ul>"
    )


def write_subject_report(
    subject: str,
    sources: Sequence[Path],
    output_dir: Path,
    bids_dir: Path,
    *,
    redraw: bool = False,
) -> Path:
    """Write ``sub-<subject>.html`` (and missing or stale figures) for these T1w images."""
    output_dir = Path(output_dir)
    sections = [_section(s, output_dir, bids_dir, draw=redraw) for s in sorted(sources)]
    toc = "".join(
        f"<li><a href='#{escape(Path(s).name)}'>{escape(Path(s).name)}</a></li>"
        for s in sorted(sources)
    )
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>dlmuse-bids: sub-{escape(subject)}</title><style>{STYLE}</style></head><body>"
        f"<h1>DLMUSE segmentation report: sub-{escape(subject)}</h1>"
        f"<p class=note>{len(sources)} T1w image(s). Automatic QC flags point at likely failures; "
        "look at every image before using its numbers.</p>"
        f"<ul>{toc}</ul>{''.join(sections)}</body></html>\n"
    )
    path = report_path(output_dir, subject)
    write_if_changed(path, page.encode("utf-8"))
    return path


def write_if_changed(path: Path, payload: bytes) -> None:
    """Write atomically, unless the file already holds exactly this (a re-run changes nothing)."""
    try:
        if path.read_bytes() == payload:
            return
    except OSError:
        pass
    write_bytes_atomic(path, payload)
