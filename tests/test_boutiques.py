"""boutiques.json: the Boutiques descriptor of ``dlmuse-bids`` agrees with the parser and app."""

from __future__ import annotations

import json
import shlex
from fnmatch import fnmatch
from pathlib import Path

import pytest

from dlmuse_bids import __version__
from dlmuse_bids.bids import (
    CENTILE_OUTPUTS,
    DSEG_TSV,
    LOGS_DIR,
    OUTPUTS,
    BIDSError,
    NoT1wError,
    derivative_path,
)
from dlmuse_bids.cli.bids_app import ANALYSIS_LEVELS, EXIT_UNKNOWN_LEVEL, build_parser
from dlmuse_bids.cli.common import (
    EXIT_CANT_CREATE,
    EXIT_NO_INPUT,
    EXIT_SOME_FAILED,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    STOP_SIGNALS,
    non_negative_int,
    positive_int,
    step_fraction,
)
from dlmuse_bids.group import GROUP_DIR, write_group_tables

DESCRIPTOR = Path(__file__).resolve().parents[1] / "boutiques.json"
NOT_OPTIONS = {"help", "version"}


@pytest.fixture(scope="module")
def descriptor():
    return json.loads(DESCRIPTOR.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bosh():
    boutiques = pytest.importorskip(
        "boutiques", reason="boutiques not installed (pip install boutiques)"
    )
    return boutiques.bosh


def _options():
    """The parser's options by primary long flag (help and version left out)."""
    return {
        next(s for s in action.option_strings if s.startswith("--")): action
        for action in build_parser()._actions
        if action.option_strings and action.dest not in NOT_OPTIONS
    }


def _positionals():
    return [action for action in build_parser()._actions if not action.option_strings]


def _inputs(descriptor):
    return {inp["id"]: inp for inp in descriptor["inputs"]}


def test_identity_and_container(descriptor):
    assert descriptor["schema-version"] == "0.5"
    assert descriptor["name"] == "dlmuse-bids"
    assert descriptor["tool-version"] == __version__
    assert descriptor["container-image"]["image"] == f"dlmuse/dlmuse-bids:{__version__}"
    assert descriptor["custom"]["BIDSAppSpecVersion"] == "1.0.0"


def test_flags_are_the_parser_options(descriptor):
    flags = {
        inp["command-line-flag"]: inp for inp in descriptor["inputs"] if "command-line-flag" in inp
    }
    options = _options()
    assert set(flags) == set(options)
    for flag, action in options.items():
        inp = flags[flag]
        assert inp["id"] == action.dest, flag  # invocation keys are the parser's dests
        assert inp.get("optional") is True, flag
        if action.nargs == 0:  # store_true, count
            assert inp["type"] == "Flag", flag
            continue
        assert inp["type"] != "Flag", flag
        assert inp.get("list", False) is (action.nargs == "+"), flag
        if action.nargs == "+":
            assert inp["min-list-entries"] == 1, flag
        assert inp.get("value-choices") == (list(action.choices) if action.choices else None)
        if action.type is positive_int:
            assert (inp["type"], inp.get("integer"), inp.get("minimum")) == ("Number", True, 1)
        elif action.type is non_negative_int:
            assert (inp["type"], inp.get("integer"), inp.get("minimum")) == ("Number", True, 0)
        elif action.type is Path:
            assert inp["type"] in ("File", "String"), flag
        elif action.type is step_fraction:
            bounds = (inp.get("minimum"), inp.get("exclusive-minimum"), inp.get("maximum"))
            assert (inp["type"], *bounds) == ("Number", 0, True, 1), flag
        else:
            assert inp["type"] == "String", flag


def test_positionals_lead_the_command_line(descriptor):
    positionals = [inp for inp in descriptor["inputs"] if "command-line-flag" not in inp]
    assert [inp["id"] for inp in positionals] == [a.dest for a in _positionals()]
    assert all(inp.get("optional") is False for inp in positionals)
    level = _inputs(descriptor)["analysis_level"]
    assert level["value-choices"] == list(ANALYSIS_LEVELS)
    keys = [inp["value-key"] for inp in descriptor["inputs"]]
    line = descriptor["command-line"]
    assert line.startswith("dlmuse-bids [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] ")
    assert line.split() == ["dlmuse-bids", *keys]


def test_error_codes_are_the_app_exit_codes(descriptor):
    codes = {
        EXIT_SOME_FAILED,
        BIDSError.exit_code,
        EXIT_UNKNOWN_LEVEL,
        NoT1wError.exit_code,
        EXIT_USAGE,
        EXIT_NO_INPUT,
        EXIT_CANT_CREATE,
        EXIT_TEMPFAIL,
        *(128 + signum for signum in STOP_SIGNALS),
    }
    assert codes == {1, 16, 17, 18, 64, 66, 73, 75, 130, 143}
    listed = [err["code"] for err in descriptor["error-codes"]]
    assert sorted(listed) == sorted(codes)
    assert all(err["description"] for err in descriptor["error-codes"])


def _templates(descriptor):
    return {out["id"]: out["path-template"] for out in descriptor["output-files"]}


def test_participant_output_templates_match_derivative_names(descriptor):
    templates = _templates(descriptor)
    assert templates["dataset_description"] == "[OUTPUT_DIR]/dataset_description.json"
    assert templates["dseg_table"] == f"[OUTPUT_DIR]/{DSEG_TSV}"
    assert templates["logs"] == f"[OUTPUT_DIR]/{LOGS_DIR}"
    for key in ("dseg", "mask", "volumes", "qc", "centiles"):
        pattern = templates[f"participant_{key}"]
        pattern = pattern.replace("[OUTPUT_DIR]", "out").replace("[PARTICIPANT_LABEL]", "01")
        for name in ("sub-01_T1w.nii.gz", "sub-01_acq-fast_run-2_T1w.nii"):
            source = Path("sub-01/anat", name)
            built = derivative_path(source, **{**OUTPUTS, **CENTILE_OUTPUTS}[key]).as_posix()
            assert fnmatch(f"out/{built}", pattern), (key, built)


def test_group_output_templates_are_the_group_tables(descriptor, tmp_path):
    (tmp_path / "raw").mkdir()
    write_group_tables([], tmp_path / "raw", tmp_path / "out")
    written = {p.name for p in (tmp_path / "out" / GROUP_DIR).iterdir()}
    group = {
        name: template
        for name, template in _templates(descriptor).items()
        if template.startswith(f"[OUTPUT_DIR]/{GROUP_DIR}/")
    }
    # the centile tables are written only when some image has centiles
    centiles = {"dlmuse_centiles.tsv", "dlmuse_centiles_icvnorm.tsv"}
    assert {Path(t).name for t in group.values()} == written | centiles
    assert all(out["optional"] for out in descriptor["output-files"] if out["id"] in group)


def test_bosh_validate(bosh):
    assert bosh(["validate", str(DESCRIPTOR)]) is None  # raises when invalid


INVOCATIONS = {
    "participant": {  # every option
        "bids_dir": "/data/bids",
        "output_dir": "out dir/dlmuse",
        "analysis_level": "participant",
        "participant_label": ["01", "sub-02"],
        "session_label": ["1"],
        "bids_filter_file": "/data/filter.json",
        "t1w_volume": 0,
        "list_participants": False,
        "skip_bids_validation": True,
        "bids_database_dir": "/scratch/pybids",
        "work_dir": "/scratch/work",
        "nprocs": 4,
        "omp_nthreads": 2,
        "device": "cpu",
        "model_dir": "/models",
        "norms_dir": "/norms",
        "offline": True,
        "mode": "exact",
        "no_tta": True,
        "step_size": 0.25,
        "precision": "bf16",
        "fast": True,
        "overwrite": True,
        "stop_on_first_crash": True,
        "nipype_plugin": "SLURM",
        "nipype_plugin_args": '{"sbatch_args": "--mem=8G --time=1:00:00"}',
        "verbose": True,
    },
    "participant_minimal": {
        "bids_dir": "bids",
        "output_dir": "out",
        "analysis_level": "participant",
    },
    "group": {
        "bids_dir": "/data/bids",
        "output_dir": "/data/out",
        "analysis_level": "group",
        "participant_label": ["01"],
    },
}


def test_one_invocation_sets_every_option():
    dests = {a.dest for a in build_parser()._actions if a.dest not in NOT_OPTIONS}
    assert set(INVOCATIONS["participant"]) == dests


def _expected(action, value):
    if action.nargs == 0:
        return 1 if action.dest == "verbose" else value  # -v counts
    if action.type is Path:
        return [Path(v) for v in value] if isinstance(value, list) else Path(value)
    return value


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_simulated_command_lines_parse(bosh, tmp_path, name):
    invocation = INVOCATIONS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(invocation), encoding="utf-8")
    rendered = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(path)]).shell_command
    argv = shlex.split(rendered)
    assert argv[0] == "dlmuse-bids"
    args = build_parser().parse_args(argv[1:])
    actions = {a.dest: a for a in build_parser()._actions if a.dest not in NOT_OPTIONS}
    for dest, action in actions.items():
        expected = _expected(action, invocation[dest]) if dest in invocation else action.default
        assert getattr(args, dest) == expected, dest
