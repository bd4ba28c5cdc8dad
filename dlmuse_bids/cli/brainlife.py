"""``dlmuse-brainlife [config.json]``: the brainlife.io App, run by ``main`` in the image.

brainlife runs an App's ``main`` in a task folder holding ``config.json``: the input T1w (datatype
``neuro/anat/t1w``, key ``t1``), the App's options and brainlife's ``_inputs`` metadata. This
lays the T1w out as a one-image BIDS dataset, runs the BIDS App's participant level on it, and
writes brainlife's datatypes into the task folder:

* ``parc/parc.nii.gz``, ``parc/label.json``, ``parc/key.txt``: ``neuro/parcellation/volume``, the
  DLMUSE label map with every MUSE label's name and colour
* ``mask/mask.nii.gz``: ``neuro/mask``, the DLICV intracranial mask
* ``parc-stats/dlmuse_volumes.csv``: ``neuro/parc-stats``, the volume of every MUSE ROI
* ``dlmuse/``: the whole BIDS-Derivatives dataset (sidecars, QC table, report)
* ``product.json``: what brainlife shows: the outcome, key volumes and the QC flags

Exit codes are the BIDS App's (0 done, 1 the image failed, 64 bad config, 66 input not found).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..settings import DEVICES
from .common import EXIT_NO_INPUT, EXIT_OK, EXIT_USAGE, setup_logging, third_party_environment

#: config.json options: name -> (type, default)
OPTIONS: dict[str, tuple[type, Any]] = {
    "tta": (bool, True),
    "fast": (bool, False),
    "device": (str, "auto"),
    "nprocs": (int, 0),
}
WORK = ".dlmuse-work"


class ConfigError(ValueError):
    """config.json cannot be used; the message says which key and why."""


def _label(value: Any, fallback: str) -> str:
    """A BIDS label (letters and digits) from brainlife's subject/session metadata."""
    text = re.sub(r"[^A-Za-z0-9]", "", str(value or ""))
    return text or fallback


def read_config(path: Path) -> dict[str, Any]:
    """The input T1w, the options and the subject/session labels of a ``config.json``."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("t1"), str):
        raise ConfigError(f"{path}: no input T1w (key 't1', a file path)")
    settings: dict[str, Any] = {"t1": (path.parent / config["t1"]).absolute()}
    for key, (kind, default) in OPTIONS.items():
        value = config.get(key, default)
        if kind is int and isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # brainlife's form gives numbers as strings at times
        if kind is bool and isinstance(value, str) and value in ("true", "false"):
            value = value == "true"
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key!r} must be a {kind.__name__}, not {value!r}")
        settings[key] = value
    if settings["device"] not in DEVICES:
        raise ConfigError(f"{path}: 'device' must be one of {', '.join(DEVICES)}")
    meta = {}
    inputs = config.get("_inputs") or []
    if inputs and isinstance(inputs[0], dict) and isinstance(inputs[0].get("meta"), dict):
        meta = inputs[0]["meta"]
    settings["subject"] = _label(meta.get("subject"), "brainlife")
    settings["session"] = _label(meta.get("session"), "") or None
    return settings


def _bids_dataset(root: Path, t1: Path, subject: str, session: str | None) -> Path:
    """A one-image BIDS dataset whose T1w is a link to ``t1``; the link's path."""
    ext = ".nii.gz" if t1.name.lower().endswith(".nii.gz") else ".nii"
    ses = f"_ses-{session}" if session else ""
    anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    anat.mkdir(parents=True)
    link = anat / f"sub-{subject}{ses}_T1w{ext}"
    link.symlink_to(t1)
    from ..bids import BIDS_VERSION

    description = {"Name": "brainlife input", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw"}
    (root / "dataset_description.json").write_text(json.dumps(description))
    return link


def _app_args(settings: Mapping[str, Any], bids: Path, out: Path, work: Path) -> list[str]:
    args = [str(bids), str(out), "participant", "--skip-bids-validation"]
    args += ["--work-dir", str(work), "--device", settings["device"]]
    if not settings["tta"]:
        args.append("--no-tta")
    if settings["fast"]:
        args.append("--fast")
    if settings["nprocs"]:
        args += ["--nprocs", str(settings["nprocs"])]
    return args


def run(config_path: Path, task_dir: Path, env: Mapping[str, str]) -> int:
    """Run the App for ``config_path`` in ``task_dir``; returns the exit code."""
    from ..bids import output_paths
    from ..brainlife import failure_reason, product, write_datatypes
    from .bids_app import build_parser, make_settings
    from .participant import run_participant

    def finish(code: int, outputs=None, failure=None) -> int:
        (task_dir / "product.json").write_text(json.dumps(product(outputs, failure), indent=1))
        return code

    try:
        settings = read_config(config_path)
    except ConfigError as exc:
        print(f"dlmuse-brainlife: {exc}", file=sys.stderr)
        return finish(EXIT_USAGE, failure=str(exc))
    t1 = settings["t1"]
    if not t1.is_file():
        msg = f"{t1}: input T1w not found"
        print(f"dlmuse-brainlife: {msg}", file=sys.stderr)
        return finish(EXIT_NO_INPUT, failure=msg)
    work = task_dir / WORK
    shutil.rmtree(work, ignore_errors=True)
    try:
        source = _bids_dataset(work / "bids", t1, settings["subject"], settings["session"])
        out = task_dir / "dlmuse"
        args = build_parser().parse_args(_app_args(settings, work / "bids", out, work / "nipype"))
        code = run_participant(make_settings(args, env), env)
        if code != EXIT_OK:
            return finish(code, failure=failure_reason(out, code))
        outputs = output_paths(source.relative_to(work / "bids"), out)
        write_datatypes(outputs, settings["subject"], task_dir)
        return finish(EXIT_OK, outputs=outputs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``dlmuse-brainlife``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="dlmuse-brainlife",
        description="DLMUSE segmentation of the T1w named in a brainlife.io config.json, "
        "written as brainlife datatypes in the current folder.",
    )
    parser.add_argument("config", nargs="?", type=Path, default=Path("config.json"))
    parser.add_argument("--version", action="version", version=f"dlmuse-bids {__version__}")
    args = parser.parse_args(argv)
    setup_logging(0)
    with third_party_environment():
        return run(args.config.absolute(), Path.cwd(), os.environ if env is None else env)
