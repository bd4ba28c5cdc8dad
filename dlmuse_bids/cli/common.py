"""What both command lines share: exit codes, the argument parser, logging."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..runner.core import Stopped, StopRequest
from ..settings import DEVICES, MODES, PRECISIONS, PipelineInference

# BIDS-Apps / sysexits exit codes
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_TEMPFAIL = 75  # images left to another run that holds them: run again later


def exit_code(report) -> int:
    """A finished run's exit code: 1 if an image failed, 75 if one was left to another run."""
    if report.failed:
        return EXIT_SOME_FAILED
    return EXIT_TEMPFAIL if report.count("busy") else EXIT_OK


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2; the BIDS-Apps spec says 64
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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


#: What stops a run: schedulers and container engines send SIGTERM first (``scancel``,
#: ``docker stop``, Kubernetes), a terminal SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn the first of :data:`STOP_SIGNALS` into :class:`Stopped`; ignore the later ones.

    The runner stops the workers and says what was finished, the work directory is removed,
    and the command exits 128 + the signal's number (143 for SIGTERM). A second signal while
    that happens is ignored: it would cut the clean-up short. The old handlers come back after.
    Outside the main thread (signals go to it alone) nothing is changed.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, _frame):
        if request.signum is None:
            request.signum = signum  # for nipype's in-process nodes, which swallow the raise
            raise Stopped(signum)

    old = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)


def said_stopped(stop: Stopped, say: Callable[[str], None]) -> int:
    """Say that a signal stopped the run and what it had finished; the exit code."""
    say(f"stopped by {signal.Signals(stop.signum).name}")
    if stop.report is not None:
        for line in stop.report.summary():
            say(line)
    say("run the same command again to finish the rest (finished images are skipped)")
    return stop.exit_code


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
    command lines run inside it. Afterwards the environment is as it was, including what
    libraries set for themselves on import (threadpoolctl, imported with nipype through
    ``scipy.io``, sets ``KMP_DUPLICATE_LIB_OK``), and the temporary folders are removed.
    """
    before = dict(os.environ)
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
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
        for _, folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def step_fraction(value: str) -> float:
    step = float(value)
    if not 0 < step <= 1:
        raise argparse.ArgumentTypeError(f"step size must be in (0, 1], got {value}")
    return step


def add_inference_options(p: argparse.ArgumentParser, device_default: str) -> None:
    """The options of :class:`~dlmuse_bids.settings.PipelineInference` (threads aside)."""
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=device_default,
        help=f"where the networks run; auto: a GPU if one is visible (default: {device_default})",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="default",
        help="default and exact: both networks as nnU-Net computes them; fast: no test-time "
        "augmentation and bf16/channels-last for both (see README, Inference modes)",
    )
    p.add_argument("--fast", action="store_true", help="the same as --mode fast")
    p.add_argument(
        "--no-tta",
        action="store_true",
        help="disable mirroring test-time augmentation in both networks (about 8x faster)",
    )
    p.add_argument(
        "--step-size",
        type=step_fraction,
        default=0.5,
        help="sliding-window step as a fraction of the tile (default: 0.5, as nnU-Net)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="arithmetic of both networks, overriding the mode's: auto = nnU-Net's (fp32 on "
        "CPU, fp16 autocast on CUDA), fp32, bf16, fp16 (autocast), or fast (bf16 on CPUs with "
        "native bf16, fp16 on CUDA, else fp32)",
    )


def inference_options(args: argparse.Namespace, num_threads: int) -> PipelineInference:
    """The :class:`~dlmuse_bids.settings.PipelineInference` of the parsed options."""
    return PipelineInference.preset(
        "fast" if args.fast else args.mode,
        device=args.device,
        num_threads=num_threads,
        tile_step_size=args.step_size,
        use_mirroring=False if args.no_tta else None,
        precision=args.precision,
    )
