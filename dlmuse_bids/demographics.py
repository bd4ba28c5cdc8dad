"""Age and sex of each scan, from the BIDS places for them.

``participants.tsv`` (``participant_id``, ``age``, ``sex``) gives a participant's age and sex;
``sub-<label>/sub-<label>_sessions.tsv`` (``session_id``, ``age``) gives the age at each
session of longitudinal data, and wins over the participant's. Sex is read in its common
spellings (``M``/``F``, ``male``/``female``, any case); codes that do not say which is which
(``1``/``2``, ``0``/``1``) are refused unless ``participants.json`` gives their ``Levels``.
Ages ``89+`` (BIDS' de-identified coding) read as 89.

Nothing here is fatal: a file that cannot be used gives one line in :attr:`Demographics.notes`
and the values it would have given are unknown.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

_MALE = {"m", "male", "man", "boy"}
_FEMALE = {"f", "female", "woman", "girl"}
_UNKNOWN = {"", "n/a", "na", "nan", "unknown", "u", "o", "other", "x"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(\+?)\s*$")


@dataclass(frozen=True)
class Subject:
    """What is known of one scan's participant: age in years and sex (``M``/``F``), or None."""

    age: float | None = None
    sex: str | None = None


@dataclass
class Demographics:
    """Ages and sexes of a dataset, and the lines that say what could not be read."""

    participants: dict[str, Subject] = field(default_factory=dict)  # "01" -> Subject
    session_ages: dict[tuple[str, str], float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def of(self, subject: str, session: str | None = None) -> Subject:
        """The age and sex at one scan (the session's age where ``sessions.tsv`` gives it)."""
        person = self.participants.get(subject, Subject())
        if session is not None and (subject, session) in self.session_ages:
            return Subject(self.session_ages[(subject, session)], person.sex)
        return person


def parse_age(text: object) -> float | None:
    """Age in years from a TSV cell (``n/a`` and blanks: None); raises ValueError if not one."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    value = str(text).strip()
    if value.lower() in _UNKNOWN:
        return None
    match = _AGE.match(value)
    if not match or not 0 <= float(match.group(1)) < 150:
        raise ValueError(f"age {value!r} is not a number of years")
    return float(match.group(1))


def sex_levels(participants_json: Path) -> dict[str, str]:
    """The sex codes ``participants.json`` defines (code -> ``M``/``F``), empty when none."""
    try:
        sidecar = json.loads(participants_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    column = sidecar.get("sex") if isinstance(sidecar, dict) else None
    levels = column.get("Levels") if isinstance(column, dict) else None
    if not isinstance(levels, dict):
        return {}
    out = {}
    for code, meaning in levels.items():
        word = str(meaning).strip().lower()
        if word in _MALE:
            out[str(code).strip().lower()] = "M"
        elif word in _FEMALE:
            out[str(code).strip().lower()] = "F"
    return out


def parse_sex(text: object, levels: Mapping[str, str]) -> str | None:
    """``M``, ``F`` or None (unknown) from a TSV cell; raises ValueError for a code that does
    not say which sex it is."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    value = str(text).strip().lower()
    if value in levels:
        return levels[value]
    if value in _MALE:
        return "M"
    if value in _FEMALE:
        return "F"
    if value in _UNKNOWN:
        return None
    raise ValueError(f"sex {str(text).strip()!r} does not say which sex it is")


def _read_tsv(path: Path, id_column: str, notes: list[str]) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        notes.append(f"{path}: not a readable TSV ({str(exc).splitlines()[0]}); ages unknown")
        return None
    if id_column not in frame.columns:
        notes.append(f"{path}: no {id_column} column; its ages and sexes are not used")
        return None
    return frame


def _subjects(
    frame: pd.DataFrame,
    columns: Mapping[str, str | None],
    levels: Mapping[str, str],
    path: Path,
    notes: list[str],
    fix: str,
) -> dict[str, Subject]:
    """id -> Subject of a table; ``columns`` names its id, age and sex columns (None: absent).
    Each unreadable age is one line; the sex codes that say nothing are one line together."""
    out: dict[str, Subject] = {}
    bad_sex: set[str] = set()
    for _, row in frame.iterrows():
        key = str(row[columns["id"]]).strip()
        age = sex = None
        try:
            age = parse_age(row[columns["age"]]) if columns["age"] else None
        except ValueError as exc:
            notes.append(f"{path}: {key}: {exc}; age unknown")
        try:
            sex = parse_sex(row[columns["sex"]], levels) if columns["sex"] else None
        except ValueError:
            bad_sex.add(str(row[columns["sex"]]).strip())
        out[key] = Subject(age, sex)
    if bad_sex:
        notes.append(
            f"{path}: sex code(s) {', '.join(sorted(bad_sex))} do not say which sex they are "
            f"({fix}); the norms of both sexes are used"
        )
    return out


def _participants(bids_dir: Path, out: Demographics) -> None:
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return
    frame = _read_tsv(path, "participant_id", out.notes)
    if frame is None:
        return
    if "age" not in frame.columns:
        out.notes.append(f"{path}: no age column")
    columns = {
        "id": "participant_id",
        "age": "age" if "age" in frame.columns else None,
        "sex": "sex" if "sex" in frame.columns else None,
    }
    sidecar = path.with_suffix(".json")
    fix = f"give their Levels in {sidecar.name}"
    people = _subjects(frame, columns, sex_levels(sidecar), path, out.notes, fix)
    out.participants.update({k.removeprefix("sub-"): v for k, v in people.items()})


def _sessions(bids_dir: Path, out: Demographics) -> None:
    for path in sorted(Path(bids_dir).glob("sub-*/sub-*_sessions.tsv")):
        subject = path.parent.name.removeprefix("sub-")
        if path.name != f"sub-{subject}_sessions.tsv":
            continue
        frame = _read_tsv(path, "session_id", out.notes)
        if frame is None or "age" not in frame.columns:
            continue
        for _, row in frame.iterrows():
            session = str(row["session_id"]).strip().removeprefix("ses-")
            try:
                out.session_ages[(subject, session)] = parse_age(row["age"])
            except ValueError as exc:
                out.notes.append(f"{path}: ses-{session}: {exc}; age unknown")
                out.session_ages[(subject, session)] = None


def read_demographics(bids_dir: Path) -> Demographics:
    """Every participant's sex and age, and every session's age, of a BIDS dataset."""
    out = Demographics()
    _participants(bids_dir, out)
    _sessions(bids_dir, out)
    return out


def read_subjects_csv(path: Path) -> tuple[dict[str, Subject], list[str]]:
    """NiChart's demographics CSV (``MRID``, ``Age``, ``Sex``; any case): MRID -> age and sex,
    and the lines that say what could not be read."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return {}, [f"{path}: not a readable CSV ({str(exc).splitlines()[0]}); ages unknown"]
    names = {c.strip().lower(): c for c in frame.columns}
    if "mrid" not in names:
        return {}, [f"{path}: no MRID column; its ages and sexes are not used"]
    notes: list[str] = []
    columns = {"id": names["mrid"], "age": names.get("age"), "sex": names.get("sex")}
    return _subjects(frame, columns, {}, path, notes, "write M or F"), notes
