"""``dlmuse-bids participant`` and ``group``: a BIDS dataset through the nipype workflow."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..bids import BIDSError, Provenance, output_paths, outputs_current
from ..models import ModelError
from ..settings import (
    GRAPH_PLUGINS,
    BIDSAppSettings,
    ModelInfo,
)
from . import core
from .core import Outcome, OutputError, RunReport, Say

logger = logging.getLogger(__name__)


def select_t1w(settings: BIDSAppSettings) -> list[Path]:
    """The T1w images the selection options pick; raises :class:`~dlmuse_bids.bids.BIDSError`."""
    from ..bids import collect_t1w, index_layout

    layout = index_layout(settings.bids_dir, settings.participant_labels, settings.database_dir)
    return collect_t1w(
        layout, settings.participant_labels, settings.session_labels, settings.bids_filters
    )


def list_participants(settings: BIDSAppSettings) -> list[str]:
    """The labels of the selected participants that have T1w images (nothing is written)."""
    from ..bids import source_entities

    return sorted({source_entities(t)["subject"] for t in select_t1w(settings)})


def _validate(settings: BIDSAppSettings, say: Say) -> None:
    from ..bids import validate_dataset

    if settings.skip_validation:
        say("input not validated (--skip-bids-validation)")
        return
    errors = validate_dataset(settings.bids_dir)
    if errors is None:
        say("bids-validator-deno not found; input not validated")
    elif errors:
        shown = "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        raise BIDSError(f"{settings.bids_dir}: not valid BIDS: {shown}")


def _check_models(folders: Mapping[str, Path]) -> dict[str, ModelInfo]:
    """Identify both models and check that they fit together, from their plans (no weights)."""
    from ..models import describe_model, model_classes
    from ..pipeline import check_models

    try:
        check_models(model_classes(folders["DLICV"]), model_classes(folders["DLMUSE"]))
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    return {key: describe_model(key, folder) for key, folder in folders.items()}


def _write_reports(t1w_files: Sequence[Path], settings: BIDSAppSettings, say: Say) -> None:
    """``sub-<label>.html`` for every selected subject (a report that fails is said, not fatal)."""
    from ..bids import source_entities
    from ..reports.subject import write_subject_report

    by_subject: dict[str, list[Path]] = {}
    for source in t1w_files:
        by_subject.setdefault(source_entities(source)["subject"], []).append(source)
    for subject, sources in sorted(by_subject.items()):
        try:
            path = write_subject_report(subject, sources, settings.output_dir, settings.bids_dir)
        except Exception as exc:  # noqa: BLE001 - the segmentations are written; say and go on
            logger.debug("report of sub-%s", subject, exc_info=True)
            say(f"sub-{subject}: report not written ({type(exc).__name__}: {exc})")
        else:
            logger.info("report: %s", path)


def _write_centiles(
    outcomes: Sequence[Outcome], settings: BIDSAppSettings, say: Say, progress=None
) -> None:
    """Each segmented image's normative centiles (see :mod:`.centiles`); never fatal.

    An image segmented again whose centiles cannot be made now loses its old table (it was of
    the old volumes); an image skipped keeps its table when the centiles cannot be made.
    """
    from ..bids import centile_paths
    from ..demographics import read_demographics
    from .centiles import resolve_norms

    done = [o.source for o in outcomes if o.status in ("processed", "skipped")]
    norms = resolve_norms(settings.norms, say, progress) if done else None
    people = read_demographics(settings.bids_dir) if norms is not None else None
    for note in people.notes if people is not None else ():
        say(note)
    processed = {o.source for o in outcomes if o.status == "processed"}
    for source in done:
        paths = centile_paths(source, settings.output_dir)
        made = people is not None and _image_centiles(source, settings, people, norms, paths, say)
        if not made and source in processed:  # an old table, of the volumes just replaced
            for path in paths.values():
                path.unlink(missing_ok=True)


def _image_centiles(source, settings: BIDSAppSettings, people, norms, paths, say: Say) -> bool:
    """Write one image's centile table; False (said) when it could not be made."""
    import pandas as pd

    from ..bids import bids_uri, source_entities
    from .centiles import write_centiles

    ent = source_entities(source)
    volumes = output_paths(source, settings.output_dir)["volumes"]
    rel = volumes.relative_to(settings.output_dir).as_posix()
    try:
        return write_centiles(
            pd.read_csv(volumes, sep="\t", na_values="n/a", keep_default_na=False),
            people.of(ent["subject"], ent.get("session")),
            norms,
            paths,
            str(source.name),
            say,
            where_age=" in participants.tsv or sessions.tsv",
            Sources=[bids_uri(source, settings.bids_dir), f"bids::{rel}"],
        )
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        say(f"{source}: normative centiles not written ({type(exc).__name__}: {exc})")
        return False


def _ran(source: Path, settings: BIDSAppSettings, prov: Provenance, crashes) -> Outcome:
    """The outcome of an image the workflow ran."""
    if outputs_current(source, settings.output_dir, prov):
        return Outcome(source, "processed")
    if source in crashes:
        crash = crashes[source]
        return Outcome(source, "failed", crash.reason.removeprefix(f"{source}: "), crash.file)
    if settings.stop_on_first_crash and crashes:
        return Outcome(source, "failed", "not run: stopped at the first failure")
    return Outcome(source, "failed", "did not complete (see the log)")


def _unfinished(source: Path, settings: BIDSAppSettings, prov: Provenance) -> Outcome:
    """The outcome of an image when the run was stopped: finished, or not (its temporaries go)."""
    from ..bids import remove_leftovers

    if outputs_current(source, settings.output_dir, prov):
        return Outcome(source, "processed")
    remove_leftovers(source, settings.output_dir)
    return Outcome(source, "stopped", "not finished: the run was stopped")


def run_participant(
    settings: BIDSAppSettings, say: Say, progress=None, stop: core.StopRequest | None = None
) -> RunReport:
    """``dlmuse-bids participant``: validate, plan, run the nipype workflow, report.

    ``settings.work_dir`` must be set (the command line makes a temporary one when the user gave
    none, and points nipype's workers at :func:`execution.write_nipype_config` there).

    Raises
    ------
    BIDSError
        The input is not valid BIDS or selects no T1w (its ``exit_code`` says which).
    ModelError
        A model is missing or the two do not fit together.
    OutputError
        The derivative dataset cannot be written.
    Stopped
        A signal stopped the run; its ``report`` says which images were finished. ``stop`` is
        where the command line notes the signal for the nodes run in this process.
    """
    from ..locks import ImageLocks

    start = time.monotonic()
    core.require_writable(settings.output_dir)
    _validate(settings, say)
    t1w_files = select_t1w(settings)
    models = _check_models(core.model_folders(settings.models, say, progress))
    template = settings.template.name if settings.template else None
    prov = core.provenance(
        settings.version, settings.inference, models, template, settings.t1w_volume
    )
    plan = core.plan_images(
        t1w_files,
        lambda p: output_paths(p, settings.output_dir)["dseg"],
        lambda p: outputs_current(p, settings.output_dir, prov),
        settings.overwrite,
        "an entity the outputs cannot carry tells them apart; filter one of them out",
    )

    def lock_name(source: Path) -> str:
        return output_paths(source, settings.output_dir)["dseg"].name

    with ImageLocks(settings.output_dir, say) as locks:
        plan = core.claim_images(
            plan,
            locks,
            lock_name,
            lambda p: outputs_current(p, settings.output_dir, prov),
            settings.overwrite,
        )
        report = _run_plan(
            plan,
            models,
            prov,
            settings,
            say,
            progress,
            start,
            stop,
            written=lambda source: locks.release(lock_name(source)),
        )
    if not report.submitted:  # after the locks: a report counts an image locked as in flight
        _write_reports(t1w_files, settings, say)
        report = dataclasses.replace(report, seconds=time.monotonic() - start)
    return report


def _run_plan(
    plan: core.Plan,
    models: Mapping[str, ModelInfo],
    prov: Provenance,
    settings: BIDSAppSettings,
    say: Say,
    progress,
    start: float,
    stop: core.StopRequest | None,
    written: Callable[[Path], None],
) -> RunReport:
    """The rest of :func:`run_participant`, once the images to run are this run's to write.

    ``written`` is told each image whose outputs are all written: its lock goes then, not at
    the end of the run, so a group level run meanwhile counts it (an image still locked is
    missing to it).
    """
    from ..bids import remove_leftovers, write_dataset_files
    from ..execution import run_workflow, workflow_batches, workflow_progress
    from ..workflows import init_participant_wf, workflow_name

    try:
        write_dataset_files(
            settings.output_dir, settings.bids_dir, settings.version, settings.container
        )
    except OSError as exc:
        why = exc.strerror or exc
        raise OutputError(f"{settings.output_dir}: cannot write dataset files ({why})") from exc
    for outcome in plan.known:
        if outcome.status in ("failed", "busy"):
            say(outcome.message)
    for source in plan.todo:
        for path in remove_leftovers(source, settings.output_dir):
            logger.info("removed %s, left by an interrupted run", path)
    logger.info("%d T1w image(s) to segment, %d already done", len(plan.todo), len(plan.known))
    outcomes = list(plan.known)
    if plan.todo:
        progress_lines = workflow_progress(
            {workflow_name(t): t for t in plan.todo}, settings, on_done=written
        )
        crashes: dict = {}
        try:
            for batch in workflow_batches(plan.todo, settings.plugin, settings.nprocs):
                if crashes and settings.stop_on_first_crash:
                    break
                wf = init_participant_wf(
                    t1w_files=batch,
                    bids_dir=settings.bids_dir,
                    output_dir=settings.output_dir,
                    models=models,
                    inference=settings.inference,
                    provenance=prov,
                    template=settings.template,
                    template_note=settings.template_note,
                    lock_writes=settings.plugin in GRAPH_PLUGINS,  # the jobs outlive our locks
                )
                images = {workflow_name(t): t for t in batch}
                crashes |= run_workflow(wf, images, settings, stop, progress_lines)
        except core.Stopped as stopped:  # the workers are stopped; say what was finished
            outcomes += [_unfinished(source, settings, prov) for source in plan.todo]
            stopped.report = RunReport(tuple(outcomes), time.monotonic() - start)
            raise
        if settings.plugin in GRAPH_PLUGINS:
            seconds = time.monotonic() - start
            return RunReport(tuple(outcomes), seconds, len(plan.todo), settings.plugin)
        outcomes += [_ran(source, settings, prov, crashes) for source in plan.todo]
    _write_centiles(outcomes, settings, say, progress)
    return RunReport(tuple(outcomes), time.monotonic() - start)


# -- dlmuse-bids group ------------------------------------------------------------------------
def run_group(settings: BIDSAppSettings, say: Say) -> str:
    """``dlmuse-bids group``: ``group/`` tables (and report) for the images the selection picks.

    Returns the closing line. A report that cannot be made is said, not fatal.

    Raises
    ------
    BIDSError
        The selection picks no T1w.
    OutputError
        The tables cannot be written.
    """
    from ..group import GROUP_DIR, write_group_tables
    from ..reports.group import write_group_report

    core.require_writable(settings.output_dir)
    t1w_files = select_t1w(settings)
    where = settings.output_dir / GROUP_DIR
    try:
        frame = write_group_tables(t1w_files, settings.bids_dir, settings.output_dir)
    except OSError as exc:
        raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from exc
    from .centiles import resolve_norms

    with_centiles = (where / "dlmuse_centiles.tsv").is_file()  # the bands need the tables
    norms = resolve_norms(settings.norms, say) if with_centiles else None
    try:
        report = write_group_report(settings.output_dir, norms)
    except Exception as exc:  # noqa: BLE001 - the tables are written; say so and go on
        say(f"group report not written ({type(exc).__name__}: {exc})")
    else:
        say(f"group report: {report}")
    counts = frame["status"].value_counts().to_dict()
    return f"group tables of {len(frame)} T1w image(s) in {where}: " + ", ".join(
        f"{n} {status}" for status, n in sorted(counts.items())
    )
