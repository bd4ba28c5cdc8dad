"""Normative centiles after the segmentation: find (or fetch) NiChart's tables, write each
image's centile table. Shared by ``dlmuse-bids participant`` and ``dlmuse run``.

Nothing here fails a run: without the tables, or without an image's age, the centiles are
skipped with one line and every other output is as it would be.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import write_bytes_atomic
from ..demographics import Subject
from ..norms import AGE_FLAG, CENTILES, NormsError, NormTables, find_norms, load_norms
from ..settings import NormsSources
from .core import Say

logger = logging.getLogger(__name__)

SKIPPED = "normative centiles skipped"
#: Column descriptions of the centile table (its JSON sidecar).
COLUMN_HELP = {
    "index": "MUSE ROI id (as in the volumes table)",
    "name": "ROI name (as in the volumes table)",
    "volume_mm3": "ROI volume in mm^3 (as in the volumes table)",
    "reference": "the normative table: CN-Males, CN-Females, or CN when sex is unknown "
    "(the ICV's own centile: CN-ICVNorm's unscaled ICV curve)",
    "centile": "centile of volume_mm3 among cognitively normal people of the same age, "
    "linear between the table's neighbouring years and centile columns; <5 or >95 outside",
    "centile_beyond": "outside 5-95 only: distance beyond the nearest edge in units of the "
    "5-95 spread (negative below the 5th)",
    "icvnorm_centile": "centile of volume_mm3 / ICV x 1,430,000 in CN-ICVNorm",
    "icvnorm_centile_beyond": "as centile_beyond, for icvnorm_centile",
}


def resolve_norms(sources: NormsSources, say: Say, progress=None) -> NormTables | None:
    """The tables of the first folder holding them, fetched on first use where allowed.

    Says one line (and returns None) when there are none or they cannot be read.
    """
    from ..fetch import FetchError, fetch_norms

    folder = find_norms(sources.search_dirs)
    if folder is None and sources.fetch_dir is not None and not sources.offline:
        try:
            fetch_norms(sources.fetch_dir, sources.endpoint, progress=progress, say=say)
        except (FetchError, OSError) as exc:
            say(f"{SKIPPED}: fetching NiChart's tables failed ({exc})")
            return None
        folder = find_norms(sources.search_dirs)
    if folder is None:
        where = ", ".join(str(d) for d in sources.search_dirs) or "nowhere"
        why = f"; not downloading them: {sources.offline}" if sources.offline else ""
        say(
            f"{SKIPPED}: NiChart's tables are not in {where}{why} (give --norms-dir DIR, or "
            "fetch them with `dlmuse norms fetch`)"
        )
        return None
    try:
        norms = load_norms(folder)
    except NormsError as exc:
        say(f"{SKIPPED}: {exc}")
        return None
    if not norms.pinned:
        say(f"{folder}: not the pinned NiChart tables; used as given (their sha256s are recorded)")
    logger.info("normative tables: %s", folder)
    return norms


def centile_sidecar(
    subject: Subject, age_used: tuple[float, float], flags: list[str], norms: NormTables, **fields
) -> dict[str, Any]:
    """The JSON sidecar of a centile table: the person, the tables, the columns."""
    return {
        "Description": "DLMUSE ROI volumes against NiChart's normative centiles of cognitively "
        f"normal people (centiles {', '.join(f'{c:g}' for c in CENTILES)})",
        **fields,
        "Age": subject.age,
        "Sex": subject.sex,
        "NormativeAgeRange": list(age_used),
        "Flags": flags,
        "NormativeTables": norms.provenance(),
        **COLUMN_HELP,
    }


def write_centiles(
    volumes: pd.DataFrame,
    subject: Subject,
    norms: NormTables,
    paths: dict[str, Path],
    label: str,
    say: Say,
    where_age: str = "",
    **fields: Any,
) -> bool:
    """Write one image's centile table and sidecar (``paths``: ``centiles``, ``centiles_json``)
    from its volumes (columns ``index``, ``name``, ``volume_mm3``).

    Returns False, saying why in one line, when the image has no age.
    """
    from ..norms import image_centiles, reference_for

    if subject.age is None:
        say(f"{label}: no age{where_age}: no normative centiles")
        return False
    frame, flags = image_centiles(volumes, subject.age, subject.sex, norms)
    age_range = norms.age_range(reference_for(subject.sex))
    if AGE_FLAG in flags:
        lo, hi = age_range
        say(
            f"{label}: age {subject.age:g} is outside the norms' {lo:g}-{hi:g}: centiles at the "
            f"nearest edge ({AGE_FLAG})"
        )
    table = frame.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    write_bytes_atomic(paths["centiles"], table.encode("utf-8"))
    sidecar = centile_sidecar(subject, age_range, flags, norms, **fields)
    write_bytes_atomic(paths["centiles_json"], (json.dumps(sidecar, indent=2) + "\n").encode())
    return True
