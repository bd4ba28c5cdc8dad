"""brainlife.io datatypes from a participant-level output (the App's ``main`` writes them).

* ``parc/parc.nii.gz``, ``parc/label.json``, ``parc/key.txt``: ``neuro/parcellation/volume``, the
  DLMUSE label map with every MUSE label's name and colour
* ``mask/mask.nii.gz``: ``neuro/mask``, the DLICV intracranial mask
* ``parc-stats/dlmuse_volumes.csv``: ``neuro/parc-stats``, the volume of every MUSE ROI
* ``product.json``: what brainlife shows: the outcome, key volumes and the QC flags
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .execution import crash_reason


def write_parcellation(dseg: Path, folder: Path) -> None:
    """``neuro/parcellation/volume``: the label map, ``label.json`` and ``key.txt``."""
    from .labels import dseg_table

    folder.mkdir(exist_ok=True)
    shutil.copyfile(dseg, folder / "parc.nii.gz")
    rows = [row for row in dseg_table().itertuples() if row.index != 0]
    labels = []
    for row in rows:
        colour = row.color.lstrip("#")
        r, g, b = (int(colour[i : i + 2], 16) for i in (0, 2, 4))
        labels.append(
            {
                "name": row.abbreviation,
                "desc": row.name,
                "label": int(row.index),
                "voxel_value": int(row.index),
                "r": r,
                "g": g,
                "b": b,
            }
        )
    (folder / "label.json").write_text(json.dumps(labels, indent=1) + "\n")
    key = "".join(f"{row.index} -> {row.index} == {row.abbreviation}\n" for row in rows)
    (folder / "key.txt").write_text(key)


def write_parc_stats(volumes: Path, subject: str, folder: Path) -> None:
    """``neuro/parc-stats``: every ROI's volume as CSV, with brainlife's subject id."""
    import pandas as pd

    from .labels import load_label_table

    folder.mkdir(exist_ok=True)
    table = pd.read_csv(volumes, sep="\t")
    names = load_label_table().set_index("index")["full_name"]
    table.insert(0, "subjectID", subject)
    table.insert(3, "full_name", table["index"].map(names))
    table.to_csv(folder / "dlmuse_volumes.csv", index=False)


def product(outputs: Mapping[str, Path] | None, failure: str | None) -> dict[str, Any]:
    """``product.json``: the outcome, the key volumes and the QC flags, for brainlife's UI."""
    if failure is not None:
        return {"brainlife": [{"type": "error", "msg": failure}]}
    import pandas as pd

    from .labels import GM_ID, ICV_ID, TOTALBRAIN_ID, WM_ID

    volumes = pd.read_csv(outputs["volumes"], sep="\t").set_index("index")["volume_mm3"]
    qc = pd.read_csv(outputs["qc"], sep="\t", keep_default_na=False).iloc[0]
    key = {"ICV": ICV_ID, "total brain": TOTALBRAIN_ID, "GM": GM_ID, "WM": WM_ID}
    ml = {name: round(float(volumes[i]) / 1000, 1) for name, i in key.items() if i in volumes}
    flags = str(qc.get("qc_flags", "")).split()
    messages = [
        {
            "type": "success",
            "msg": f"DLMUSE {__version__}: "
            + ", ".join(f"{name} {value} mL" for name, value in ml.items()),
        }
    ]
    messages += [
        {"type": "warning", "msg": f"QC flag {flag} (see dlmuse/ for the QC table and report)"}
        for flag in flags
    ]
    return {"brainlife": messages, "dlmuse": {"version": __version__, "ml": ml, "qc": flags}}


def failure_reason(out: Path, code: int) -> str:
    """Why the image failed, from the crash file the app left, or the exit code."""
    for crash in sorted((out / "logs").glob("*.txt")):
        return f"DLMUSE failed (exit {code}): {crash_reason(crash.read_text(errors='replace'))}"
    return f"DLMUSE failed (exit {code}); see the task log"


def write_datatypes(outputs: Mapping[str, Path], subject: str, task_dir: Path) -> None:
    """The parcellation, mask and parc-stats datatypes of one image's outputs."""
    write_parcellation(outputs["dseg"], task_dir / "parc")
    (task_dir / "mask").mkdir(exist_ok=True)
    shutil.copyfile(outputs["mask"], task_dir / "mask" / "mask.nii.gz")
    write_parc_stats(outputs["volumes"], subject, task_dir / "parc-stats")
