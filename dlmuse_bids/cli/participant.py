"""The participant level of ``dlmuse-bids``: find T1w images, run the workflow, report."""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..bids import (
    LOGS_DIR,
    BIDSError,
    Provenance,
    crash_log_name,
    output_paths,
    outputs_current,
    remove_leftovers,
    validate_dataset,
    write_dataset_files,
)
from ..io import write_bytes_atomic
from ..settings import GRAPH_PLUGINS, SLURM_PLUGINS, BIDSAppSettings, ModelInfo
from .common import (
    EXIT_CANT_CREATE,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_SOME_FAILED,
    nipype_log_level,
    patched_environ,
    selected_t1w,
)
from .models_cmd import ensure_models

logger = logging.getLogger("dlmuse_bids")


def _say(message: str) -> None:
    print(f"dlmuse-bids: {message}", file=sys.stderr, flush=True)


def load_models(settings: BIDSAppSettings, env: Mapping[str, str]) -> dict[str, ModelInfo]:
    """Find both models, load them once on the CPU to check them, and record their identity."""
    from ..models import find_model, load_trained_model
    from ..nnunet.predictor import InferenceOptions
    from ..pipeline import check_models

    dirs = ensure_models(settings.model_dir, settings.offline, env)
    infos, predictors = {}, {}
    for key in ("DLICV", "DLMUSE"):
        model = load_trained_model(find_model(key, dirs))
        predictors[key] = model.predictor(InferenceOptions(device="cpu", threads=1))
        infos[key] = ModelInfo(key, model.folder.absolute(), tuple(model.folds), model.sha256)
    try:
        check_models(predictors["DLICV"], predictors["DLMUSE"])
    except ValueError as exc:
        from ..models import ModelError

        raise ModelError(str(exc)) from exc
    return infos


@dataclass
class Outcome:
    """What happened to one T1w."""

    source: Path
    status: str  # "processed", "skipped", "failed"
    message: str = ""
    crash_file: Path | None = None


@dataclass
class Progress:
    """nipype status callback: a line per image as it finishes, a bar on a terminal."""

    images: dict[str, Path]  # sub-workflow name -> T1w
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    sinks: tuple[str, ...] = ()  # the sinks of each image (workflows.sink_nodes); () = default
    started: dict[str, float] = field(default_factory=dict)
    sinks_done: dict[str, set] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _image(self, node) -> str | None:
        for part in node.fullname.split("."):
            if part in self.images:
                return part
        return None

    def __call__(self, node, status: str) -> None:
        from ..workflows import SINK_NODES

        sinks = self.sinks or SINK_NODES
        wf = self._image(node)
        if wf is None:
            return
        with self.lock:
            self.started.setdefault(wf, time.monotonic())
            if wf in self.finished:
                return
            if status == "exception":
                self._finish(wf, "failed")
            elif status == "end" and node.name in sinks:
                self.sinks_done.setdefault(wf, set()).add(node.name)
                if len(self.sinks_done[wf]) == len(sinks):
                    self._finish(wf, "done")

    def _finish(self, wf: str, what: str) -> None:
        self.finished[wf] = what
        seconds = time.monotonic() - self.started[wf]
        n, total = len(self.finished), len(self.images)
        line = f"[{n}/{total}] {self.images[wf].name}: {what} in {seconds:.0f} s"
        if self.stream.isatty():  # the line above a bar that is redrawn in place
            filled = round(30 * n / total)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r\033[K{line}\n[{bar}] {n}/{total} images")
            if n == total:
                self.stream.write("\n")
        else:
            print(line, file=self.stream)
        self.stream.flush()


def _plan(
    t1w_files: list[Path], settings: BIDSAppSettings, provenance: Provenance
) -> tuple[list[Path], list[Outcome]]:
    """Images to run, and the outcomes already known (skipped, or refused for a name clash)."""
    todo: list[Path] = []
    known: list[Outcome] = []
    owners: dict[Path, Path] = {}
    for source in t1w_files:
        dseg = output_paths(source, settings.output_dir)["dseg"]
        if dseg in owners:
            known.append(
                Outcome(
                    source,
                    "failed",
                    f"{source}: same output names as {owners[dseg]} (an entity the outputs "
                    "cannot carry tells them apart); filter one of them out",
                )
            )
            continue
        owners[dseg] = source
        if not settings.overwrite and outputs_current(source, settings.output_dir, provenance):
            known.append(Outcome(source, "skipped", "outputs exist with the same provenance"))
        else:
            todo.append(source)
    return todo, known


@dataclass(frozen=True)
class Crash:
    """One image's first crash: its reason, and its copy in ``logs/`` (None if not written)."""

    reason: str
    file: Path | None


def _collect_crashes(crash_dir: Path, images: dict[str, Path], logs: Path) -> dict[Path, Crash]:
    """Move nipype's crash files to ``logs/``, named after their image; source -> first crash.

    A crash file that cannot be written to ``logs/`` (a full disk) is said, not fatal: the
    reason still reaches the summary.
    """
    found: dict[Path, Crash] = {}
    if not crash_dir.is_dir():
        return found
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(encoding="utf-8", errors="replace")
        first = text.splitlines()[0] if text else ""
        parts = first.removeprefix("Node: ").split(".")
        wf = next((p for p in parts if p in images), None)
        if wf is None:
            continue
        source = images[wf]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(crash.stat().st_mtime))
        target = logs / crash_log_name(source, parts[-1], stamp)
        n = 1
        while target.exists():
            n += 1
            target = logs / crash_log_name(source, f"{parts[-1]}{n}", stamp)
        try:
            logs.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, text.encode("utf-8"))
        except OSError as exc:
            _say(f"{target}: crash file not written ({exc.strerror or exc})")
            written = None
        else:
            written = target
        crash.unlink()
        found.setdefault(source, Crash(crash_reason(text), written))
    return found


def crash_reason(text: str) -> str:
    """The exception line of a crash file's traceback."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "^", "~")):
            name, _, message = line.partition(":")
            if name.replace(".", "").replace("_", "").isalnum():
                return message.strip() or name
    return lines[-1] if lines else "failed"


def _nipype_config(work_dir: Path, verbosity: int) -> Path:
    """A nipype config with our log levels; its folder, for ``NIPYPE_CONFIG_DIR``.

    Workers import nipype afresh and read ``$NIPYPE_CONFIG_DIR/nipype.cfg``; without this they
    would log every node at INFO whatever ``-v`` says.
    """
    level = nipype_log_level(verbosity)
    config_dir = work_dir / "nipype-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "nipype.cfg").write_text(
        "[logging]\n"
        f"workflow_level = {level}\ninterface_level = {level}\nutils_level = {level}\n"
        "[execution]\ncheck_version = false\n"
    )
    return config_dir


def _run_workflow(todo: list[Path], settings: BIDSAppSettings, models, provenance) -> dict:
    """Build and run the nipype workflow; the crash files it left, by source."""
    from ..workflows import (
        init_participant_wf,
        request_slurm_resources,
        sink_nodes,
        workflow_name,
    )

    images = {workflow_name(t): t for t in todo}
    temporary = settings.work_dir is None
    work_dir = (
        Path(tempfile.mkdtemp(prefix="dlmuse-bids-work-")) if temporary else settings.work_dir
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    # workers (and SLURM jobs) started during wf.run inherit these; the launcher gets its own back
    environ = {"NIPYPE_CONFIG_DIR": str(_nipype_config(work_dir, settings.verbosity))}
    if settings.plugin in GRAPH_PLUGINS:  # jobs crash after we return: nipype's names, in logs/
        crash_dir = settings.output_dir / LOGS_DIR
    else:
        crash_dir = Path(tempfile.mkdtemp(prefix="crash-", dir=work_dir))
    try:
        wf = init_participant_wf(
            t1w_files=todo,
            bids_dir=settings.bids_dir,
            output_dir=settings.output_dir,
            models=models,
            inference=settings.inference,
            provenance=provenance,
            template=settings.template,
            template_note=settings.template_note,
        )
        wf.base_dir = str(work_dir)
        if settings.plugin in SLURM_PLUGINS:
            user_args = str(settings.plugin_args.get("sbatch_args", ""))
            request_slurm_resources(wf, user_args, every_node=settings.plugin in GRAPH_PLUGINS)
            # nipype names every job after $LOGNAME, which batch environments may lack
            environ["LOGNAME"] = os.environ.get("LOGNAME") or getpass.getuser()
        wf.config["execution"].update(
            {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": settings.stop_on_first_crash,
                "remove_unnecessary_outputs": False,
            }
        )
        plugin_args: dict = {}
        if settings.plugin not in GRAPH_PLUGINS:  # they cannot report progress
            plugin_args["status_callback"] = Progress(
                images, sinks=sink_nodes(settings.template is not None)
            )
        if settings.plugin in ("MultiProc", "LegacyMultiProc"):
            # forkserver: workers never inherit a torch state from this process (as fMRIPrep)
            plugin_args.update(
                n_procs=settings.nprocs, mp_context="forkserver", raise_insufficient=False
            )
            # nipype sleeps this long after every scheduling pass: its 2 s default idles an
            # image's chain of nodes for seconds; a local pass costs microseconds (schedulers'
            # plugins keep the default, each pass asks squeue/qstat about every job)
            wf.config["execution"]["poll_sleep_duration"] = 0.1
        plugin_args.update(settings.plugin_args)
        try:
            with patched_environ(environ):
                wf.run(plugin=settings.plugin, plugin_args=plugin_args)
        except RuntimeError as exc:  # nipype: "Workflow did not execute cleanly"
            logger.info("workflow reported failures: %s", str(exc).splitlines()[0])
        if settings.plugin in GRAPH_PLUGINS:
            return {}
        return _collect_crashes(crash_dir, images, settings.output_dir / LOGS_DIR)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif settings.plugin not in GRAPH_PLUGINS:
            shutil.rmtree(crash_dir, ignore_errors=True)


def run_participant(settings: BIDSAppSettings, env: Mapping[str, str]) -> int:
    """The participant level; returns the exit code."""
    from dataclasses import asdict

    from ..models import ModelError

    start = time.monotonic()
    try:
        if settings.skip_validation:
            _say("input not validated (--skip-bids-validation)")
        else:
            errors = validate_dataset(settings.bids_dir)
            if errors is None:
                _say("bids-validator-deno not found; input not validated")
            elif errors:
                shown = "; ".join(errors[:5]) + (
                    f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
                )
                raise BIDSError(f"{settings.bids_dir}: not valid BIDS: {shown}")
        t1w_files = selected_t1w(settings)
    except BIDSError as exc:
        _say(str(exc))
        return exc.exit_code
    try:
        models = load_models(settings, env)
    except ModelError as exc:
        _say(str(exc))
        return EXIT_NO_INPUT
    provenance = Provenance(
        version=settings.version,
        tta=settings.inference.tta,
        step_size=settings.inference.step_size,
        models={key: info.provenance() for key, info in models.items()},
        template=settings.template.name if settings.template else None,
        precision=_precision_label(settings),
        t1w_volume=settings.t1w_volume,
    )
    todo, outcomes = _plan(t1w_files, settings, provenance)
    try:
        write_dataset_files(
            settings.output_dir, settings.bids_dir, settings.version, settings.container
        )
    except OSError as exc:
        _say(f"{settings.output_dir}: cannot write dataset files ({exc.strerror or exc})")
        return EXIT_CANT_CREATE
    for outcome in outcomes:
        if outcome.status == "failed":
            _say(outcome.message)
    for source in todo:
        for path in remove_leftovers(source, settings.output_dir):
            logger.info("removed %s, left by an interrupted run", path)
    logger.info("%d T1w image(s) to segment, %d already done", len(todo), len(outcomes))
    logger.debug("settings: %s", asdict(settings))
    crashes = _run_workflow(todo, settings, models, provenance) if todo else {}
    if todo and settings.plugin in GRAPH_PLUGINS:
        _say(
            f"{len(todo)} image(s) submitted with {settings.plugin}; run this command again "
            "when the jobs are done to check them (finished images are skipped)"
        )
        return EXIT_OK
    for source in todo:
        if outputs_current(source, settings.output_dir, provenance):
            outcomes.append(Outcome(source, "processed"))
        elif source in crashes:
            crash = crashes[source]
            reason = crash.reason.removeprefix(f"{source}: ")
            outcomes.append(Outcome(source, "failed", reason, crash.file))
        elif settings.stop_on_first_crash and crashes:
            outcomes.append(Outcome(source, "failed", "not run: stopped at the first failure"))
        else:
            outcomes.append(Outcome(source, "failed", "did not complete (see the log)"))
    _write_reports(t1w_files, settings)
    return _summary(outcomes, time.monotonic() - start)


def list_participants(settings: BIDSAppSettings) -> int:
    """Print the labels of the selected participants that have T1w images, one per line.

    Nothing is validated or written (a job array's launcher runs this on the login node); the
    pybids index goes to ``--bids-database-dir`` if one is given, as in a run.
    """
    from ..bids import source_entities

    try:
        t1w_files = selected_t1w(settings)
    except BIDSError as exc:
        _say(str(exc))
        return exc.exit_code
    for label in sorted({source_entities(t)["subject"] for t in t1w_files}):
        print(label)
    return EXIT_OK


def _precision_label(settings: BIDSAppSettings) -> str:
    """The arithmetic the networks will use, as recorded in the sidecars (e.g. ``bf16``)."""
    from ..interfaces import resolve_device
    from ..nnunet.predictor import resolve_precision

    device = resolve_device(settings.inference.device)
    label = resolve_precision(settings.inference.precision, device)
    return f"{label}, channels-last" if settings.inference.channels_last else label


def _write_reports(t1w_files: list[Path], settings: BIDSAppSettings) -> None:
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
            _say(f"sub-{subject}: report not written ({type(exc).__name__}: {exc})")
        else:
            logger.info("report: %s", path)


def _summary(outcomes: list[Outcome], seconds: float) -> int:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("processed", "skipped", "failed")}
    _say(
        f"{counts['processed']} processed, {counts['skipped']} skipped (outputs up to date), "
        f"{counts['failed']} failed, in {seconds:.0f} s"
    )
    for o in outcomes:
        if o.status == "failed":
            where = f" [crash file: {o.crash_file}]" if o.crash_file else ""
            _say(f"failed: {o.source}: {o.message}{where}")
    return EXIT_SOME_FAILED if counts["failed"] else EXIT_OK
