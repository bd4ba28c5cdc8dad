"""What both command lines share: exit codes, the argument parser, logging."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import BIDSAppSettings

# BIDS-Apps / sysexits exit codes
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2; the BIDS-Apps spec says 64
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot take outputs (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".dlmuse-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"output directory not writable ({exc.strerror or exc})"
    return None


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return n


def setup_logging(verbosity: int) -> None:
    """Log to stderr; -v for info, -vv for debug."""
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("dlmuse_bids").setLevel(level)  # also when the root was set up already


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the time of the block, then as it was."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def third_party_environment() -> Iterator[None]:
    """Set what third-party libraries read from ``os.environ`` for one command; restore it after.

    * ``HOME``, when ``~`` cannot be resolved: pybids looks up ``~/.pybids`` when imported, and
      ``Path.home()`` raises where HOME is unset and the uid has no passwd entry (a container run
      as an arbitrary uid with a cleaned environment). They get an empty temporary home.
    * ``MPLCONFIGDIR``, when unset: matplotlib would keep its font cache in the home directory,
      which a container may not let us write; it gets a temporary folder.
    * ``NIPYPE_NO_ET=1``: nipype asks a web service for news when imported; never from a node.

    With :func:`patched_environ`, the only code in the package that writes ``os.environ``; the
    command lines run inside it. Temporary folders are removed afterwards.
    """
    values, made = {"NIPYPE_NO_ET": os.environ.get("NIPYPE_NO_ET", "1")}, []
    try:
        Path.home()
    except (RuntimeError, KeyError):
        made.append(("HOME", tempfile.mkdtemp(prefix="dlmuse-home-")))
    if not os.environ.get("MPLCONFIGDIR"):
        made.append(("MPLCONFIGDIR", tempfile.mkdtemp(prefix="dlmuse-matplotlib-")))
    values.update(made)
    try:
        with patched_environ(values):
            yield
    finally:
        for _, folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def nipype_log_level(verbosity: int) -> str:
    """nipype's log level for a ``-v`` count.

    By default nipype says nothing: a failing node's traceback goes to its crash file and the
    run's summary gives the one-line reason. ``-v`` shows its warnings and errors, ``-vv`` every
    node, ``-vvv`` debug output.
    """
    return ("CRITICAL", "WARNING", "INFO")[verbosity] if verbosity < 3 else "DEBUG"


#: --precision choices (dlmuse_bids.nnunet.predictor.PRECISIONS, kept here to parse without torch)
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def add_speed_options(p: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--fast`` (the TTA switch is added by each command)."""
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="arithmetic of the networks: auto = nnU-Net's (fp32 on CPU, fp16 autocast on "
        "CUDA; the default), or fp32, bf16, fp16 (autocast)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="faster approximation: no test-time augmentation, channels-last layout, bf16 on "
        "CPUs with native bf16 (AVX512-BF16/AMX) and fp16 on CUDA; an explicit --precision wins",
    )


def speed_settings(args: argparse.Namespace, device: str) -> tuple[str, bool, bool]:
    """(precision, channels_last, tta) from ``--precision``, ``--fast`` and ``--no-tta``."""
    if not args.fast:
        return args.precision or "auto", False, not args.no_tta
    precision = args.precision
    if precision is None:
        from ..nnunet.predictor import cpu_has_fast_bf16

        precision = "auto" if device != "cpu" else ("bf16" if cpu_has_fast_bf16() else "fp32")
    return precision, True, False


def selected_t1w(settings: BIDSAppSettings) -> list[Path]:
    """The T1w images that the selection options pick; raises ``bids.BIDSError``."""
    from ..bids import collect_t1w, index_layout

    layout = index_layout(settings.bids_dir, settings.participant_labels, settings.database_dir)
    return collect_t1w(
        layout, settings.participant_labels, settings.session_labels, settings.bids_filters
    )
