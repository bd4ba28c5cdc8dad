"""Running the participant workflow with nipype: its config, progress lines and crash files.

What nipype needs besides the graph (:mod:`dlmuse_bids.workflows`): a config its worker
processes read, a status callback that says when each image is done, and the crash files it
leaves, moved to the derivative dataset's ``logs/`` under their image's name.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .atomic import write_bytes_atomic
from .bids import LOGS_DIR, crash_log_name
from .settings import GRAPH_PLUGINS, SLURM_PLUGINS, BIDSAppSettings

logger = logging.getLogger(__name__)

#: The file name nipype reads from ``$NIPYPE_CONFIG_DIR``.
NIPYPE_CONFIG = "nipype.cfg"
#: nipype's loggers, set from ``-v`` (:func:`nipype_log_level`).
NIPYPE_LOGGERS = ("nipype.workflow", "nipype.interface", "nipype.utils")


def nipype_log_level(verbosity: int) -> str:
    """nipype's log level for a ``-v`` count.

    By default nipype says nothing: a failing node's traceback goes to its crash file and the
    run's summary gives the one-line reason. ``-v`` shows its warnings and errors, ``-vv`` every
    node, ``-vvv`` debug output.
    """
    return ("CRITICAL", "WARNING", "INFO")[verbosity] if verbosity < 3 else "DEBUG"


def configure_nipype_logging(verbosity: int) -> None:
    """Set nipype's loggers in this process (it sets their levels itself when imported)."""
    import nipype  # noqa: F401 - importing nipype sets its loggers' levels; then we do

    for name in NIPYPE_LOGGERS:
        nipype_logger = logging.getLogger(name)
        nipype_logger.setLevel(nipype_log_level(verbosity))
        nipype_logger.propagate = False  # nipype has its own handler; avoid every line twice


def write_nipype_config(work_dir: Path, verbosity: int) -> Path:
    """A nipype config with our log levels, under ``work_dir``; its folder.

    Workers import nipype afresh and read ``$NIPYPE_CONFIG_DIR/nipype.cfg``; without it they
    would log every node at INFO whatever ``-v`` says. The command line points
    ``NIPYPE_CONFIG_DIR`` here for the time of the run.
    """
    level = nipype_log_level(verbosity)
    config_dir = work_dir / "nipype-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / NIPYPE_CONFIG).write_text(
        "[logging]\n"
        f"workflow_level = {level}\ninterface_level = {level}\nutils_level = {level}\n"
        "[execution]\ncheck_version = false\n"
    )
    return config_dir


def image_of(fullname: str, images: dict[str, Path]) -> str | None:
    """The image sub-workflow (a key of ``images``) that the node ``fullname`` belongs to."""
    return next((part for part in fullname.split(".") if part in images), None)


#: The processors MultiProc counts for its launching process's own nodes
#: (``run_without_submitting``): less than any worker's job asks for, so only those fit in it.
#: nipype skips a scheduling pass when the workers hold every processor, so the sinks and the
#: mosaic of an image waited for the next image's network (45-65 s on a 2-core study).
LAUNCHER_SHARE = 0.5


def image_order_plugin(name: str, images: dict[str, Path], plugin_args: dict, stop=None):
    """nipype's ``Linear`` or ``MultiProc`` plugin, taking the images in turn; else None.

    Both plugins follow a topological order that runs each step for every image before the
    next step for any: no image is finished until the last one has had its DLICV, so a run
    killed at 90 % (a wall time, a ``scancel``) keeps nothing. These run an image's nodes
    before a later image's, so images finish one by one (``nprocs`` at a time), and a run
    that is stopped keeps every image finished so far. The work is the same. MultiProc also
    runs the nodes of this process (sinks, mosaic) beside a network that holds every processor
    (:data:`LAUNCHER_SHARE`), and gives out the workers' jobs of a pass before it runs them.

    ``stop`` (a :class:`~dlmuse_bids.runner.core.StopRequest`) is looked at between images
    (Linear) and at every scheduling pass (MultiProc): a stop raised in a node this process
    runs reaches nipype as that node's failure, and the run must not go on to the next image.
    """
    check = stop.check if stop is not None else lambda: None
    from nipype.pipeline.plugins import LinearPlugin, MultiProcPlugin

    if stop is not None and "status_callback" in plugin_args:
        report = plugin_args["status_callback"]

        def status(node, what: str) -> None:
            # a node this process runs when the signal comes fails with it: that image is not
            # finished (the runner says so), not failed
            if what == "exception" and stop.signum is not None:
                return
            report(node, what)

        plugin_args = {**plugin_args, "status_callback": status}

    rank = {wf: i for i, wf in enumerate(images)}

    def image_rank(node) -> int:
        wf = image_of(node.fullname, images)
        return rank[wf] if wf is not None else len(rank)

    class ImageOrderLinearPlugin(LinearPlugin):
        def run(self, graph, config, updatehash=False):
            import networkx as nx

            groups = sorted(
                nx.weakly_connected_components(graph),
                key=lambda nodes: min(image_rank(n) for n in nodes),
            )
            stop_first = str(config["execution"]["stop_on_first_crash"]).lower() in ("true", "1")
            errors = []
            cwd = os.getcwd()  # nipype's Linear restores it only when it is not interrupted
            try:
                for nodes in groups:
                    check()
                    try:
                        super().run(graph.subgraph(nodes).copy(), config, updatehash=updatehash)
                    except Exception as exc:  # noqa: BLE001 - nipype's own; the first is raised
                        check()
                        errors.append(exc)
                        if stop_first:
                            break
            finally:
                os.chdir(cwd)
            if errors:
                raise errors[0]

    class ImageOrderMultiProcPlugin(MultiProcPlugin):
        def _sort_jobs(self, jobids, scheduler="tsort"):
            check()  # each scheduling pass
            jobids = super()._sort_jobs(jobids, scheduler=scheduler)
            # the workers' jobs are given out first, then this process runs its own: the next
            # network starts before the last image's sinks and mosaic, which run beside it
            return sorted(  # stable
                jobids,
                key=lambda j: (self.procs[j].run_without_submitting, image_rank(self.procs[j])),
            )

        def _check_resources(self, running_tasks):
            # this process's share (no worker's job fits in it): a pass while the workers hold
            # every processor still runs this process's nodes, which ask for none of them
            memory, processors, gpus = super()._check_resources(running_tasks)
            return memory, processors + LAUNCHER_SHARE, gpus

        stopping = False

        def _async_callback(self, args):
            if self.stopping:  # a worker ended by stop_workers: its broken task is not a result
                return
            super()._async_callback(args)

        def run(self, graph, config, updatehash=False):
            for node in graph.nodes:
                if node.run_without_submitting and not hasattr(node.inputs, "num_threads"):
                    node.n_procs = 0  # runs here, on no worker's processor
            with collections_of_new_objects_only():
                try:
                    return super().run(graph, config, updatehash=updatehash)
                except BaseException:  # a signal's Stopped, KeyboardInterrupt: no worker goes on
                    self.stopping = True
                    stop_workers(getattr(self, "pool", None))
                    raise

    plugins = {"Linear": ImageOrderLinearPlugin, "MultiProc": ImageOrderMultiProcPlugin}
    return plugins[name](plugin_args=plugin_args) if name in plugins else None


@contextlib.contextmanager
def collections_of_new_objects_only():
    """Garbage collections inside see only the objects made inside (:func:`gc.freeze`).

    nipype's MultiProc runs a full collection before every scheduling pass and after each node
    it runs in this process. A full collection walks every object the process holds (pybids'
    index, nipype's graph, the imported libraries): about 0.2 s each on a 2-core machine, in
    the loop that starts every node, about 17 times an image. What is alive when the run
    starts stays alive until it ends, so it is left out of them; the run's own garbage is
    still collected. On leaving, the frozen objects are collected normally again.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def stop_workers(pool, grace: float = 5.0) -> None:
    """End the worker processes of a ``ProcessPoolExecutor`` now, their tasks unfinished.

    ``shutdown`` alone waits for running tasks (a network pass can take minutes); the workers
    get SIGTERM, then SIGKILL after ``grace`` seconds. The executor keeps its processes in
    ``_processes`` (Python 3.14 has ``terminate_workers`` for this).
    """
    if pool is None:
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()
    pool.shutdown(wait=False, cancel_futures=True)


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
    #: Told each T1w whose outputs are all written (its lock can go before the run ends).
    on_done: Callable[[Path], None] | None = None

    def __call__(self, node, status: str) -> None:
        from .workflows import SINK_NODES

        sinks = self.sinks or SINK_NODES
        wf = image_of(node.fullname, self.images)
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
        if what == "done" and self.on_done is not None:
            self.on_done(self.images[wf])
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


@dataclass(frozen=True)
class Crash:
    """One image's first crash: its reason, and its copy in ``logs/`` (None if not written)."""

    reason: str
    file: Path | None


def crash_reason(text: str) -> str:
    """The exception line of a crash file's traceback."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "^", "~")):
            name, _, message = line.partition(":")
            if name.replace(".", "").replace("_", "").isalnum():
                return message.strip() or name
    return lines[-1] if lines else "failed"


def collect_crashes(crash_dir: Path, images: dict[str, Path], logs: Path) -> dict[Path, Crash]:
    """Move nipype's crash files to ``logs/``, named after their image; source -> first crash.

    A crash file that cannot be written to ``logs/`` (a full disk) is logged, not fatal: the
    reason still reaches the summary.
    """
    found: dict[Path, Crash] = {}
    if not crash_dir.is_dir():
        return found
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(encoding="utf-8", errors="replace")
        first = text.splitlines()[0] if text else ""
        parts = first.removeprefix("Node: ").split(".")
        wf = image_of(first.removeprefix("Node: "), images)
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
            logger.error("%s: crash file not written (%s)", target, exc.strerror or exc)
            written = None
        else:
            written = target
        crash.unlink()
        found.setdefault(source, Crash(crash_reason(text), written))
    return found


#: The fewest images in one nipype workflow with a local plugin (:func:`workflow_batches`).
BATCH_IMAGES = 200
#: ... and per process: a batch's last images leave the other processes idle until they end.
BATCH_IMAGES_PER_PROCESS = 25


def workflow_batches(todo: Sequence[Path], plugin: str, nprocs: int) -> list[Sequence[Path]]:
    """The images in the groups that each become one nipype workflow, in order.

    nipype's cost of building and expanding a workflow grows faster than its size: 10,000
    images (150,000 nodes) took 247 s and 2.7 GiB before the first node ran
    (``benchmarks/study_scale.py``). The local plugins (Linear, MultiProc), which take images
    in turn anyway, get them in batches of ``max(200, 25 * nprocs)``; a scheduler's plugin
    gets them all at once, to keep every image in its queue.
    """
    if plugin not in ("Linear", "MultiProc"):
        return [todo]
    size = max(BATCH_IMAGES, BATCH_IMAGES_PER_PROCESS * nprocs)
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def workflow_progress(
    images: dict[str, Path],
    settings: BIDSAppSettings,
    on_done: Callable[[Path], None] | None = None,
) -> Progress | None:
    """The progress lines of a run's images over all its workflows; None where not shown."""
    from .workflows import sink_nodes

    if settings.plugin in GRAPH_PLUGINS:  # they cannot report progress
        return None
    return Progress(images, sinks=sink_nodes(settings.template is not None), on_done=on_done)


def _plugin_args(settings: BIDSAppSettings, images: dict[str, Path], wf, progress) -> dict:
    plugin_args: dict = {}
    if progress is None:
        progress = workflow_progress(images, settings)
    if progress is not None:
        plugin_args["status_callback"] = progress
    if settings.plugin in ("MultiProc", "LegacyMultiProc"):
        # forkserver: workers never inherit a torch state from this process (as fMRIPrep)
        plugin_args.update(
            n_procs=settings.nprocs, mp_context="forkserver", raise_insufficient=False
        )
        # nipype sleeps this long after every scheduling pass: its 2 s default idles an image's
        # chain of nodes for seconds; a local pass costs microseconds (schedulers' plugins keep
        # the default, each pass asks squeue/qstat about every job)
        wf.config["execution"]["poll_sleep_duration"] = 0.1
    plugin_args.update(settings.plugin_args)
    return plugin_args


def run_workflow(
    wf, images: dict[str, Path], settings: BIDSAppSettings, stop=None, progress=None
) -> dict[Path, Crash]:
    """Run the participant workflow ``wf`` in ``settings.work_dir``; its crashes, by source.

    ``images`` maps each image's sub-workflow name to its T1w. With a graph plugin the jobs
    run after this returns and crash under nipype's own names in ``logs/``: nothing to collect.
    ``progress`` (:func:`workflow_progress`) carries the progress lines over a run's batches;
    ``stop`` is the command line's :class:`~dlmuse_bids.runner.core.StopRequest`.
    """
    from .workflows import request_slurm_resources

    work_dir = settings.work_dir
    if work_dir is None:
        raise ValueError("the participant workflow needs a work directory")
    work_dir.mkdir(parents=True, exist_ok=True)
    graph = settings.plugin in GRAPH_PLUGINS
    logs = settings.output_dir / LOGS_DIR
    crash_dir = logs if graph else Path(tempfile.mkdtemp(prefix="crash-", dir=work_dir))
    wf.base_dir = str(work_dir)
    if settings.plugin in SLURM_PLUGINS:
        user_args = str(settings.plugin_args.get("sbatch_args", ""))
        request_slurm_resources(wf, user_args, every_node=graph)
    wf.config["execution"].update(
        {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": settings.stop_on_first_crash,
            "remove_unnecessary_outputs": False,
        }
    )
    plugin_args = _plugin_args(settings, images, wf, progress)
    plugin = image_order_plugin(settings.plugin, images, plugin_args, stop) or settings.plugin
    try:
        try:
            wf.run(plugin=plugin, plugin_args=plugin_args)
        except RuntimeError as exc:  # nipype: "Workflow did not execute cleanly"
            logger.info("workflow reported failures: %s", str(exc).splitlines()[0])
        if stop is not None:
            stop.check()  # the last node's failure may have been the stop
        return {} if graph else collect_crashes(crash_dir, images, logs)
    finally:
        if not graph:
            shutil.rmtree(crash_dir, ignore_errors=True)
