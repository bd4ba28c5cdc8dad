"""What every run shares: the plan, the outcomes, the report, provenance and models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bids import BIDSError, Provenance
from ..io import unwritable
from ..models import ModelError
from ..settings import NETWORKS, InferenceOptions, ModelInfo, ModelSources, PipelineInference

logger = logging.getLogger(__name__)

Say = Callable[[str], None]


class OutputError(Exception):
    """The outputs cannot be written (EX_CANTCREAT); the message names the place and why."""

    exit_code = 73


#: What stops a whole run: each has a one-line message and the ``exit_code`` to exit with.
RUN_ERRORS = (BIDSError, ModelError, OutputError)


class Stopped(BaseException):  # noqa: N818 - a request, like KeyboardInterrupt, not an error
    """The run was asked to stop by signal ``signum`` (SIGTERM from ``scancel``/``docker stop``).

    The command line's signal handler raises it. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on its way (nipype's Linear plugin catches those per node)
    takes it for one node's failure. A runner that catches it on the way out sets ``report``:
    the outcome of every image, those not finished as ``stopped``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.report: RunReport | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a command its signal ended (143)."""
        return 128 + self.signum


@dataclass
class StopRequest:
    """Whether a stop was asked for (the signal's number), for code that must look for itself.

    The command line sets it before it raises :class:`Stopped`. nipype turns any exception in
    a node it runs in this process (the Linear plugin's nodes) into that node's failure, so
    the plugins look here between nodes (:func:`dlmuse_bids.execution.image_order_plugin`).
    """

    signum: int | None = None

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop was asked for."""
        if self.signum is not None:
            raise Stopped(self.signum)


@dataclass(frozen=True)
class Outcome:
    """What happened to one T1w image."""

    source: Path
    #: "processed", "skipped", "failed", "stopped" (not finished: :class:`Stopped`) or "busy"
    #: (another run holds it: :func:`claim_images`)
    status: str
    message: str = ""
    crash_file: Path | None = None


@dataclass(frozen=True)
class Plan:
    """The images to run, and the outcomes known before running (skipped, or refused)."""

    todo: tuple[Path, ...]
    known: tuple[Outcome, ...]


def plan_images(
    sources: Iterable[Path],
    output_key: Callable[[Path], Any],
    is_current: Callable[[Path], bool],
    overwrite: bool,
    clash_hint: str,
) -> Plan:
    """Decide, for each source in order, to run it, skip it or refuse it.

    An image whose ``output_key`` (what names its outputs) was taken by an earlier one is
    refused with ``clash_hint``; one whose outputs are current (``is_current``: present with
    this run's provenance) is skipped unless ``overwrite``.
    """
    todo: list[Path] = []
    known: list[Outcome] = []
    owners: dict[Any, Path] = {}
    for source in sources:
        key = output_key(source)
        if key in owners:
            msg = f"{source}: same output names as {owners[key]}; {clash_hint}"
            known.append(Outcome(source, "failed", msg))
            continue
        owners[key] = source
        if not overwrite and is_current(source):
            known.append(Outcome(source, "skipped", "outputs exist with the same provenance"))
        else:
            todo.append(source)
    return Plan(tuple(todo), tuple(known))


def claim_images(
    plan: Plan,
    locks,
    lock_name: Callable[[Path], str],
    is_current: Callable[[Path], bool],
    overwrite: bool,
) -> Plan:
    """``plan`` with only the images this run could lock (:class:`~dlmuse_bids.locks.ImageLocks`).

    An image another run holds is left to it (``busy``). One whose outputs became current while
    this run planned (the other run finished it) is skipped unless ``overwrite``. Call it
    before touching any image's outputs: a busy image's temporaries are the other run's.
    """
    todo: list[Path] = []
    known = list(plan.known)
    for source in plan.todo:
        other = locks.take(lock_name(source))
        if other is not None:
            msg = f"{source}: being segmented by another run ({other}); left to it"
            known.append(Outcome(source, "busy", msg))
        elif not overwrite and is_current(source):
            locks.release(lock_name(source))
            known.append(Outcome(source, "skipped", "outputs exist with the same provenance"))
        else:
            todo.append(source)
    return Plan(tuple(todo), tuple(known))


@dataclass(frozen=True)
class RunReport:
    """The outcome of every image of a run, and how long the run took."""

    outcomes: tuple[Outcome, ...]
    seconds: float
    submitted: int = 0  # images handed to a scheduler that runs them after we return
    plugin: str = ""  # the nipype plugin they were submitted with

    def count(self, status: str) -> int:
        """How many images ended with ``status``."""
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> bool:
        """Whether any image failed."""
        return self.count("failed") > 0

    def summary(self) -> list[str]:
        """The closing lines: the counts, then one line per failed image."""
        if self.submitted:
            lines = [
                f"{self.submitted} image(s) submitted with {self.plugin}; run this command again "
                "when the jobs are done to check them (finished images are skipped)"
            ]
        else:
            stopped, busy = self.count("stopped"), self.count("busy")
            lines = [
                f"{self.count('processed')} processed, {self.count('skipped')} skipped (outputs "
                f"up to date), {self.count('failed')} failed, "
                + (f"{stopped} not finished (stopped), " if stopped else "")
                + (f"{busy} left to another run, " if busy else "")
                + f"in {self.seconds:.0f} s"
            ]
        for o in self.outcomes:
            if o.status == "failed":
                where = f" [crash file: {o.crash_file}]" if o.crash_file else ""
                lines.append(f"failed: {o.source}: {o.message}{where}")
            elif o.status == "busy":
                lines.append(f"busy: {o.message}")
        return lines


def require_writable(directory: Path) -> None:
    """Create ``directory`` if needed; raise :class:`OutputError` if it cannot take outputs."""
    problem = unwritable(directory)
    if problem:
        raise OutputError(f"{directory}: {problem}")


# -- models and provenance --------------------------------------------------------------------
def precision_label(options: InferenceOptions) -> str:
    """The arithmetic a network will use, as sidecars record it (e.g. ``bf16, channels-last``)."""
    from ..nnunet.predictor import resolve_device, resolve_precision

    label = resolve_precision(options.precision, resolve_device(options.device))
    return f"{label}, channels-last" if options.channels_last else label


def network_provenance(options: InferenceOptions) -> dict[str, Any]:
    """How one network was evaluated, as the sidecars record it (``Inference.<network>``)."""
    from ..nnunet.predictor import resolve_device, resolve_threads_per_pass

    return {
        "TestTimeAugmentation": options.use_mirroring,
        "TileStepSize": options.tile_step_size,
        "Precision": precision_label(options),
        "ThreadsPerPass": resolve_threads_per_pass(
            options.threads_per_pass, resolve_device(options.device)
        ),
    }


def provenance(
    version: str,
    inference: PipelineInference,
    models: Mapping[str, ModelInfo],
    template: str | None = None,
    t1w_volume: int | None = None,
) -> Provenance:
    """What outputs must share with this run to be kept (:meth:`Provenance.matches`)."""
    return Provenance(
        version=version,
        inference={name: network_provenance(inference.network(name)) for name in NETWORKS},
        models={key: info.provenance() for key, info in models.items()},
        template=template,
        mode=inference.mode,
        t1w_volume=t1w_volume,
    )


def model_folders(sources: ModelSources, say: Say, progress=None) -> dict[str, Path]:
    """Both model folders, fetched first when missing and allowed (:func:`fetch.ensure_models`)."""
    from ..fetch import ensure_models
    from ..models import find_model

    dirs = ensure_models(sources, progress=progress, say=say)
    return {key: find_model(key, dirs) for key in ("DLICV", "DLMUSE")}
