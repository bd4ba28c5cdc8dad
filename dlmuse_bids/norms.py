"""NiChart's normative centile curves of DLMUSE volumes, and where one image sits on them.

NiChart (CBICA) publishes, for cognitively normal (CN) people aged 40-93, the 5th, 25th, 50th,
75th and 95th centiles of every DLMUSE ROI volume at each whole year of age: one table for
everyone (``CN``), one per sex (``CN-Males``, ``CN-Females``) and one of volumes scaled to
NiChart's reference ICV (``CN-ICVNorm``: ROI / ICV x 1,430,000). ROIs are named there;
``list_MUSE_all.csv`` maps names to MUSE ids. The tables are never shipped in the package:
they are fetched (:mod:`dlmuse_bids.fetch`) or given as a folder holding the files under
NiChart's names (:data:`TABLE_FILES`).

A subject's centile is interpolated linearly in age between the two neighbouring years of the
table, then linearly between the two neighbouring centile columns. Outside the 5-95 range no
number is made up: it is ``<5`` or ``>95``, with the distance beyond that edge in units of the
5-95 spread. Ages outside a table's range use its nearest edge and are flagged
(:data:`AGE_FLAG`). NiChart's own viewer takes the row of the nearest whole age instead; the
two agree at whole ages.

This module knows nothing of BIDS: volumes, age and sex come in, a table comes out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .models import default_cache_dir, sha256_file

logger = logging.getLogger(__name__)

#: The normative tables, by reference name, under NiChart's file names.
TABLE_FILES: dict[str, str] = {
    "CN": "dlmuse_centiles_CN.csv",
    "CN-Males": "dlmuse_centiles_CN-Males.csv",
    "CN-Females": "dlmuse_centiles_CN-Females.csv",
    "CN-ICVNorm": "dlmuse_centiles_CN-ICVNorm.csv",
}
#: NiChart's ROI names and MUSE ids (``Index, Code, Name``).
ROI_LIST_FILE = "list_MUSE_all.csv"
NORM_FILES = (*TABLE_FILES.values(), ROI_LIST_FILE)
#: Where :mod:`dlmuse_bids.fetch` gets them: the NiChart_Project repository at this commit.
NICHART_REPO = "CBICA/NiChart_Project"
NICHART_COMMIT = "1a04acb4ce41cc69472c79647ddeb85e73946544"
_NICHART_CENTILES = "resources/reference_data/centiles"
#: (path in the repository, size, sha256) of each table, by local file name.
NICHART_FILES = {
    "dlmuse_centiles_CN.csv": (
        f"{_NICHART_CENTILES}/dlmuse_centiles_CN.csv",
        1480648,
        "1b2730bd466aee9a8cc9976f98ff826d22c5753ba81d7d7b604bc8053bc915b8",
    ),
    "dlmuse_centiles_CN-Males.csv": (
        f"{_NICHART_CENTILES}/dlmuse_centiles_CN-Males.csv",
        1442961,
        "08facf747ca7d16305463ae325d6bfb39458b3766dde54188685ee9722b62ce5",
    ),
    "dlmuse_centiles_CN-Females.csv": (
        f"{_NICHART_CENTILES}/dlmuse_centiles_CN-Females.csv",
        1469955,
        "36f90f6a7ca79236086769849b6b89ae86eb148584b7f83227104138fb427df2",
    ),
    "dlmuse_centiles_CN-ICVNorm.csv": (
        f"{_NICHART_CENTILES}/dlmuse_centiles_CN-ICVNorm.csv",
        1475192,
        "7edb0bb6eea0bb6373c424f1d4f745553ccdcfb9f86eeb4fd4f0f5332e458576",
    ),
    "list_MUSE_all.csv": (
        "resources/MUSE/list_MUSE_all.csv",
        7996,
        "78d6ee7f78caa73d6fa4fca1936295bffc59d30fa3d6f1ad124e3a1c174b8069",
    ),
}
CENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
CENTILE_COLUMNS = tuple(f"centile_{int(c)}" for c in CENTILES)
#: The ICV that ``CN-ICVNorm`` volumes are scaled to (NiChart's reference ICV), mm³.
REFERENCE_ICV_MM3 = 1_430_000.0
ICV_ID = 702
SEX_REFERENCE = {"M": "CN-Males", "F": "CN-Females", None: "CN"}
ICVNORM_REFERENCE = "CN-ICVNorm"
#: Flag of an image whose age lies outside a table's ages (its nearest edge was used).
AGE_FLAG = "age-outside-norms"
#: VarNames of the tables that are not ROI volumes.
NOT_ROIS = frozenset({"DL_BrainAge", "SPARE_BA"})
#: Table names that neither equal a ``list_MUSE_all.csv`` name nor differ from one by
#: underscores and case only. CorpusCallosum's rows come twice in every table (as Frontal_WM_L's
#: do, for 82 and its one-member composite 417): single ROI 95 (``CorpCall`` in the list) and
#: its one-member composite 501.
ALIASES: dict[str, tuple[int, ...]] = {
    "CorpusCallosum": (95, 501),
    "PosteriorLimbInternalCapsuleIncCerebralPeduncle_L": (94,),
    "PosteriorLimbInternalCapsuleIncCerebralPeduncle_R": (93,),
    "Ventricle_L": (517,),  # "Ventricles_L" in the list
}
COLUMNS = (
    "index",
    "name",
    "volume_mm3",
    "reference",
    "centile",
    "centile_beyond",
    "icvnorm_centile",
    "icvnorm_centile_beyond",
)


class NormsError(ValueError):
    """A normative table is unreadable or malformed; the message names the file."""


@dataclass(frozen=True)
class Curve:
    """One ROI's centile curves in one table: ``values[i]`` are the centiles at ``ages[i]``."""

    ages: np.ndarray  # (n,) whole years, increasing
    values: np.ndarray  # (n, 5) the CENTILE_COLUMNS, each row non-decreasing

    def at(self, age: float) -> tuple[np.ndarray, bool]:
        """The five centiles at ``age`` (linear between years) and whether it was clamped."""
        lo, hi = float(self.ages[0]), float(self.ages[-1])
        clamped = not lo <= age <= hi
        a = min(max(age, lo), hi)
        row = np.array([np.interp(a, self.ages, self.values[:, k]) for k in range(5)])
        return row, clamped


@dataclass(frozen=True)
class Centile:
    """Where one volume sits: ``value`` inside the 5-95 range, else ``text`` and ``beyond``."""

    value: float | None  # 5..95, None outside
    beyond: float | None  # outside: (v - edge) / (c95 - c5); negative below the 5th
    age_clamped: bool

    @property
    def text(self) -> str:
        """The TSV cell: the centile, or ``<5`` / ``>95``."""
        if self.value is not None:
            return f"{self.value:.2f}"
        if self.beyond is None:
            return "n/a"  # no volume to place
        return "<5" if self.beyond < 0 else ">95"


def place(volume: float, centiles: Sequence[float]) -> tuple[float | None, float | None]:
    """The centile of ``volume`` among five centile values (5th..95th), or how far outside.

    Inside ``[c5, c95]`` it is linear between the two neighbouring columns (on a column it is
    that column's centile); outside it is ``(None, beyond)`` with ``beyond`` the distance past
    the nearest edge in units of ``c95 - c5`` (negative below the 5th); a volume that is not a
    finite number is ``(None, None)``.
    """
    c = np.asarray(centiles, dtype=float)
    spread = float(c[-1] - c[0])
    if not math.isfinite(volume):
        return None, None
    if volume < c[0]:
        return None, (volume - c[0]) / spread if spread > 0 else -math.inf
    if volume > c[-1]:
        return None, (volume - c[-1]) / spread if spread > 0 else math.inf
    k = next(k for k in range(4) if volume <= c[k + 1])  # c[4] >= volume: always found
    width = c[k + 1] - c[k]
    frac = (volume - c[k]) / width if width > 0 else 0.0
    return CENTILES[k] + frac * (CENTILES[k + 1] - CENTILES[k]), None


def centile(volume: float, age: float, curve: Curve) -> Centile:
    """:func:`place` of ``volume`` on ``curve`` at ``age`` (the nearest edge outside it)."""
    row, clamped = curve.at(age)
    value, beyond = place(volume, row)
    return Centile(value, beyond, clamped)


class RoiNames:
    """Table ROI names -> MUSE ids, from ``list_MUSE_all.csv`` and :data:`ALIASES`."""

    def __init__(self, roi_list: pd.DataFrame) -> None:
        self.exact: dict[str, list[int]] = {}
        for index, name in zip(roi_list["Index"], roi_list["Name"], strict=True):
            self.exact.setdefault(str(name), []).append(int(index))
        self.loose: dict[str, list[int]] = {}
        for name, ids in self.exact.items():
            self.loose.setdefault(self._loose(name), []).extend(ids)

    @staticmethod
    def _loose(name: str) -> str:
        return name.replace("_", "").lower()

    def ids(self, name: str) -> tuple[int, ...]:
        """The MUSE ids ``name`` stands for (empty when it is no known ROI): an alias, the
        list's name, else the list's name but for underscores and case."""
        if name in ALIASES:
            return ALIASES[name]
        if name in self.exact:
            return tuple(self.exact[name])
        return tuple(self.loose.get(self._loose(name), ()))


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise NormsError(f"{path}: missing") from exc
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise NormsError(f"{path}: not a readable CSV ({exc})") from exc
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise NormsError(f"{path}: lacks the column(s) {', '.join(lacking)}")
    return frame


def _curves(path: Path, names: RoiNames) -> dict[int, Curve]:
    """MUSE id -> curve of one table (rows given twice for one age must be the same)."""
    frame = _read_csv(path, ("VarName", "Age", *CENTILE_COLUMNS))
    columns = ["Age", *CENTILE_COLUMNS]
    try:
        frame[columns] = frame[columns].astype(float)
    except (TypeError, ValueError) as exc:
        raise NormsError(f"{path}: non-numeric Age or centile values ({exc})") from exc
    if not np.isfinite(frame[columns].to_numpy()).all():
        raise NormsError(f"{path}: missing or non-finite Age or centile values")
    # a name given twice (NiChart's Frontal_WM_L: ids 82 and 417) has each age twice, alike
    frame = frame.drop_duplicates(["VarName", *columns]).sort_values(["VarName", "Age"])
    twice = frame.duplicated(["VarName", "Age"])
    if twice.any():
        name, age = frame.loc[twice, ["VarName", "Age"]].iloc[0]
        raise NormsError(f"{path}: {name} has two different rows for age {age:g}")
    ages, values = frame["Age"].to_numpy(), frame[list(CENTILE_COLUMNS)].to_numpy()
    curves: dict[int, Curve] = {}
    for name, rows in frame.groupby("VarName", sort=False).indices.items():
        roi_ids = names.ids(str(name))
        if not roi_ids:
            if name not in NOT_ROIS:
                logger.debug("%s: %s is not a MUSE ROI; skipped", path.name, name)
            continue
        if (np.diff(values[rows], axis=1) < 0).any():
            raise NormsError(f"{path}: {name}'s centiles decrease from one column to the next")
        curve = Curve(ages[rows], values[rows])
        for roi in roi_ids:
            curves[roi] = curve
    if not curves:
        raise NormsError(f"{path}: no row names a MUSE ROI of {ROI_LIST_FILE}")
    return curves


@dataclass(frozen=True)
class NormTables:
    """The four normative tables of one folder, as curves by MUSE id."""

    directory: Path
    curves: Mapping[str, Mapping[int, Curve]]  # reference name -> MUSE id -> curve
    sha256: Mapping[str, str]  # file name -> digest

    @property
    def pinned(self) -> bool:
        """Whether every file is the one :data:`NICHART_FILES` pins."""
        return all(self.sha256.get(name) == pin[2] for name, pin in NICHART_FILES.items())

    def provenance(self) -> dict[str, object]:
        """JSON-ready description for sidecars."""
        return {
            "Source": f"https://github.com/{NICHART_REPO}",
            "Commit": NICHART_COMMIT if self.pinned else None,
            "SHA256": dict(self.sha256),
        }

    def age_range(self, reference: str) -> tuple[float, float]:
        """The youngest and oldest ages of a table."""
        ages = [float(c.ages[0]) for c in self.curves[reference].values()]
        ages_hi = [float(c.ages[-1]) for c in self.curves[reference].values()]
        return min(ages), max(ages_hi)


def load_norms(directory: Path) -> NormTables:
    """Read and check the tables in ``directory`` (:data:`NORM_FILES`); raises NormsError."""
    directory = Path(directory)
    roi_list = _read_csv(directory / ROI_LIST_FILE, ("Index", "Name"))
    try:
        names = RoiNames(roi_list.astype({"Index": int}))
    except (TypeError, ValueError) as exc:
        raise NormsError(f"{directory / ROI_LIST_FILE}: non-integer Index ({exc})") from exc
    curves = {ref: _curves(directory / name, names) for ref, name in TABLE_FILES.items()}
    digests = {name: sha256_file(directory / name) for name in NORM_FILES}
    return NormTables(directory, curves, digests)


def norms_search_dirs(norms_dir: Path | None, env: Mapping[str, str]) -> list[Path]:
    """Folders searched for the tables, in order: ``--norms-dir``, ``$DLMUSE_NORMS_DIR``, the
    per-user cache (``$XDG_CACHE_HOME/dlmuse-bids/norms``)."""
    dirs = [Path(norms_dir)] if norms_dir is not None else []
    if env.get("DLMUSE_NORMS_DIR"):
        dirs.append(Path(env["DLMUSE_NORMS_DIR"]))
    dirs.append(default_cache_dir(env).parent / "norms")
    return dirs


def find_norms(search_dirs: Sequence[Path]) -> Path | None:
    """The first folder of ``search_dirs`` holding every file of :data:`NORM_FILES`."""
    for base in search_dirs:
        if all((Path(base) / name).is_file() for name in NORM_FILES):
            return Path(base)
    return None


def reference_for(sex: str | None) -> str:
    """The table of a sex (``"M"``, ``"F"``, or None when unknown: ``CN``)."""
    return SEX_REFERENCE[sex]


def image_centiles(
    volumes: pd.DataFrame, age: float, sex: str | None, norms: NormTables
) -> tuple[pd.DataFrame, list[str]]:
    """The centiles of one image's ROI volumes, and its flags.

    Parameters
    ----------
    volumes : pandas.DataFrame
        The image's volumes table (columns ``index``, ``name``, ``volume_mm3``; the ICV,
        id 702, is needed for the ICV-normalised centiles). The ICV's own centile comes from
        the one unscaled curve of ``CN-ICVNorm`` (NiChart publishes ICV nowhere else), and
        has no ICV-normalised centile.
    age : float
        Age in years at the scan.
    sex : {"M", "F"} or None
        None when unknown: the table of everyone (``CN``) is used.
    norms : NormTables

    Returns
    -------
    (pandas.DataFrame, list of str)
        One row per ROI the tables cover, in the volumes table's order, columns
        :data:`COLUMNS`; and ``[AGE_FLAG]`` when the age lies outside a table used.
    """
    reference = reference_for(sex)
    curves, normed = norms.curves[reference], norms.curves[ICVNORM_REFERENCE]
    icv_rows = volumes.loc[volumes["index"].astype(int) == ICV_ID, "volume_mm3"]
    icv = float(icv_rows.iloc[0]) if len(icv_rows) else None
    rows, clamped = [], False
    table = zip(volumes["index"], volumes["name"], volumes["volume_mm3"], strict=True)
    for roi, name, volume in table:
        roi, volume = int(roi), float(volume)
        row = {"index": roi, "name": name, "volume_mm3": volume}
        if roi in curves:
            raw = centile(volume, age, curves[roi])
            row["reference"] = reference
        elif roi == ICV_ID and roi in normed:
            # the ICV-normalised table's one unscaled curve: ICV itself, of everyone
            raw = centile(volume, age, normed[roi])
            row["reference"] = ICVNORM_REFERENCE
        else:
            continue
        clamped |= raw.age_clamped
        row.update(_cells("centile", raw))
        if roi != ICV_ID and roi in normed and icv:
            scaled = centile(volume / icv * REFERENCE_ICV_MM3, age, normed[roi])
            clamped |= scaled.age_clamped
            row.update(_cells("icvnorm_centile", scaled))
        else:
            row.update({"icvnorm_centile": "n/a", "icvnorm_centile_beyond": "n/a"})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame, [AGE_FLAG] if clamped else []


def _cells(prefix: str, c: Centile) -> dict[str, str]:
    beyond = "n/a" if c.beyond is None else f"{c.beyond:.3f}"
    return {prefix: c.text, f"{prefix}_beyond": beyond}
