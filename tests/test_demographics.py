"""dlmuse_bids.demographics: age and sex from participants.tsv, sessions.tsv and their sidecar."""

from __future__ import annotations

import json

import pytest

from dlmuse_bids.demographics import Subject, parse_age, parse_sex, read_demographics


def _tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in rows) + "\n")


def test_common_spellings_of_sex_and_age():
    for text, sex in [("M", "M"), ("male", "M"), (" Female ", "F"), ("f", "F"), ("n/a", None)]:
        assert parse_sex(text, {}) == sex
    for code in ("1", "2", "0", "X1"):
        with pytest.raises(ValueError, match="does not say which sex"):
            parse_sex(code, {})
    assert parse_sex("1", {"1": "M", "2": "F"}) == "M"
    assert parse_age("71.5") == 71.5 and parse_age("89+") == 89 and parse_age("n/a") is None
    for bad in ("forty", "-3", "200", "7 1"):
        with pytest.raises(ValueError, match="not a number of years"):
            parse_age(bad)


def test_participants_and_sessions(tmp_path):
    _tsv(
        tmp_path / "participants.tsv",
        [
            ("participant_id", "age", "sex", "group"),
            ("sub-01", "70", "F", "CN"),
            ("sub-02", "n/a", "male", "AD"),
            ("sub-03", "old", "M", "CN"),
        ],
    )
    _tsv(
        tmp_path / "sub-01" / "sub-01_sessions.tsv",
        [("session_id", "age"), ("ses-1", "70.2"), ("ses-2", "72.9")],
    )
    people = read_demographics(tmp_path)
    assert people.of("01", "1") == Subject(70.2, "F")
    assert people.of("01", "2") == Subject(72.9, "F")
    assert people.of("01", "3") == Subject(70.0, "F")  # not in sessions.tsv: the participant's
    assert people.of("02") == Subject(None, "M")
    assert people.of("03") == Subject(None, "M") and people.of("99") == Subject()
    assert len(people.notes) == 1 and "sub-03: age 'old'" in people.notes[0]


def test_ambiguous_codes_need_their_levels(tmp_path):
    rows = [("participant_id", "age", "sex"), ("sub-01", "60", "1"), ("sub-02", "61", "2")]
    _tsv(tmp_path / "participants.tsv", rows)
    people = read_demographics(tmp_path)
    assert people.of("01") == Subject(60.0, None)
    assert len(people.notes) == 1 and "sex code(s) 1, 2 do not say" in people.notes[0]
    sidecar = {"sex": {"Levels": {"1": "male", "2": "female"}}}
    (tmp_path / "participants.json").write_text(json.dumps(sidecar))
    people = read_demographics(tmp_path)
    assert people.of("01").sex == "M" and people.of("02").sex == "F" and not people.notes


def test_unusable_files_give_one_line_each(tmp_path):
    assert read_demographics(tmp_path).notes == []  # no participants.tsv: nothing to say
    (tmp_path / "participants.tsv").write_bytes(b"\x00\x01\xff\xfe")
    people = read_demographics(tmp_path)
    assert people.of("01") == Subject() and len(people.notes) == 1
    assert "participants.tsv" in people.notes[0]
    _tsv(tmp_path / "participants.tsv", [("subject", "age"), ("01", "70")])
    people = read_demographics(tmp_path)
    path = tmp_path / "participants.tsv"
    assert people.notes == [f"{path}: no participant_id column; its ages and sexes are not used"]
