"""Rules of the package's shape: who may touch the process environment, what the CLI does."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nibabel as nib

from tests.conftest import needs_shared, synthetic_head
from tests.support.bids import STANDARD_T1W, make_dataset, run_app

PACKAGE = Path(__file__).resolve().parents[1] / "dlmuse_bids"
#: the one module that writes os.environ (patched_environ / third_party_environment)
ENVIRON_WRITER = PACKAGE / "cli" / "common.py"


def _environ_uses(path: Path) -> list[tuple[int, str]]:
    """Lines of ``path`` that read or write the process environment, with what they do."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            names = {alias.name for alias in node.names}
            if names & {"environ", "getenv", "putenv"}:
                found.append((node.lineno, "from os import environ"))
    return found


def test_only_the_command_lines_read_the_environment():
    offenders = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in path.relative_to(PACKAGE).parts and (uses := _environ_uses(path))
    }
    assert offenders == {}, "pass an env mapping from the command line instead"


def test_the_command_lines_import_neither_torch_nor_nipype():
    """cli/ parses, builds settings, calls the runner and prints: --help needs no heavy import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import dlmuse_bids.cli.bids_app, dlmuse_bids.cli.dlmuse, dlmuse_bids.cli.brainlife\n"
        "import dlmuse_bids.cli.participant, dlmuse_bids.cli.group_level\n"
        "print(sorted({'torch', 'nipype'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


#: functions of cli/ that only declare arguments (exempt from the length rule)
PARSER_BUILDERS = {"build_parser", "build_dlmuse_parser", "add_models_parser"}


def test_no_long_functions_in_the_command_lines():
    long = {}
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef) or node.name in PARSER_BUILDERS:
                continue
            if (n := node.end_lineno - node.lineno + 1) > 50:
                long[f"{path.name}:{node.name}"] = n
    assert long == {}, "move the work into dlmuse_bids.runner"


def _environ_writes(path: Path) -> list[int]:
    """Lines of ``path`` that assign to, delete from or update ``os.environ``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        target = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del):
            target = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("update", "setdefault", "pop", "clear", "popitem")
        ):
            target = node.func.value
        if (
            isinstance(target, ast.Attribute)
            and target.attr == "environ"
            and isinstance(target.value, ast.Name)
            and target.value.id == "os"
        ):
            lines.append(node.lineno)
    return lines


def test_one_place_writes_the_environment():
    writers = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ENVIRON_WRITER and (lines := _environ_writes(path))
    }
    assert writers == {}, "set variables with cli.common.patched_environ"
    assert _environ_writes(ENVIRON_WRITER), "the rule above would pass on any code"


@needs_shared
def test_a_bids_app_run_leaves_the_environment_as_it_was(tiny_models, tmp_path):
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3]])
    before = dict(os.environ)
    code = run_app(
        raw, tmp_path / "out", "--no-tta", "--device", "cpu", "--skip-bids-validation",
        models=tiny_models, env={"TEMPLATEFLOW_HOME": str(tmp_path / "none")},
    )  # fmt: skip
    assert code == 0
    assert dict(os.environ) == before


@needs_shared
def test_a_dlmuse_run_leaves_the_environment_as_it_was(tiny_models, tmp_path):
    from dlmuse_bids.cli import dlmuse_main

    head = tmp_path / "in" / "head_T1w.nii.gz"
    head.parent.mkdir()
    nib.save(synthetic_head(), head)
    before = dict(os.environ)
    argv = ["run", str(head), "-o", str(tmp_path / "out"), "--no-tta"]
    assert dlmuse_main([*argv, "--device", "cpu", "--model-dir", str(tiny_models)]) == 0
    assert dict(os.environ) == before
