"""The participant level of ``dlmuse-bids``: nipype's process settings, the runner, the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import runner
from ..settings import SLURM_PLUGINS, BIDSAppSettings
from .common import EXIT_OK, exit_code, patched_environ, said_stopped, stop_on_signals
from .models_cmd import ProgressPrinter


def _say(message: str) -> None:
    print(f"dlmuse-bids: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _with_work_dir(settings: BIDSAppSettings) -> Iterator[BIDSAppSettings]:
    """``settings`` with a work directory: a temporary one, removed after, when none was given."""
    if settings.work_dir is not None:
        yield settings
        return
    work_dir = tempfile.mkdtemp(prefix="dlmuse-bids-work-")
    try:
        yield dataclasses.replace(settings, work_dir=Path(work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def nipype_environ(settings: BIDSAppSettings, env: Mapping[str, str]) -> dict[str, str]:
    """What nipype's workers (and SLURM jobs) must find in their environment for this run.

    They inherit it while the workflow runs: the config with our log levels
    (:func:`dlmuse_bids.execution.write_nipype_config`) and, for SLURM, ``LOGNAME``, which
    nipype names every job after and batch environments may lack.
    """
    from ..execution import write_nipype_config

    values = {"NIPYPE_CONFIG_DIR": str(write_nipype_config(settings.work_dir, settings.verbosity))}
    if settings.plugin in SLURM_PLUGINS:
        values["LOGNAME"] = env.get("LOGNAME") or getpass.getuser()
    return values


def run_participant(settings: BIDSAppSettings, env: Mapping[str, str]) -> int:
    """The participant level; returns the exit code."""
    from ..execution import configure_nipype_logging

    configure_nipype_logging(settings.verbosity)
    try:
        with (
            stop_on_signals() as stop,
            _with_work_dir(settings) as settings,
            patched_environ(nipype_environ(settings, env)),
        ):
            report = runner.run_participant(settings, _say, ProgressPrinter(), stop)
    except runner.RUN_ERRORS as exc:
        _say(str(exc))
        return exc.exit_code
    except runner.Stopped as stop:
        return said_stopped(stop, _say)
    for line in report.summary():
        _say(line)
    return exit_code(report)


def list_participants(settings: BIDSAppSettings) -> int:
    """Print the labels of the selected participants that have T1w images, one per line.

    Nothing is validated or written (a job array's launcher runs this on the login node); the
    pybids index goes to ``--bids-database-dir`` if one is given, as in a run.
    """
    try:
        labels = runner.list_participants(settings)
    except runner.RUN_ERRORS as exc:
        _say(str(exc))
        return exc.exit_code
    for label in labels:
        print(label)
    return EXIT_OK
