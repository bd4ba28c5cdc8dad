"""Running workflows with nipype: the order images are taken in."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dlmuse_bids.execution import (
    collections_of_new_objects_only,
    image_order_plugin,
    workflow_batches,
)

STEPS = ("reorient", "dlicv", "dlmuse", "sink")


def _step(value):
    if value == "fail":
        raise ValueError("this image fails")
    if value == "stop":  # as the command line's handler does when SIGTERM arrives
        import signal

        from dlmuse_bids.runner import Stopped

        raise Stopped(signal.SIGTERM)
    return value


def _study(base: Path, names: tuple[str, ...], failing: str = "", stopping: str = ""):
    """A workflow of one four-step chain per image, like the participant workflow."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    study = pe.Workflow(name="dlmuse_bids_wf", base_dir=str(base))
    # as the runner sets it (nipype's 2 s default sleeps after every scheduling pass)
    study.config["execution"]["poll_sleep_duration"] = 0.1
    for name in names:
        image = pe.Workflow(name=name)
        nodes = [
            pe.Node(
                Function(input_names=["value"], output_names=["value"], function=_step),
                name=step,
            )
            for step in STEPS
        ]
        nodes[0].inputs.value = "fail" if name == failing else "stop" if name == stopping else name
        for a, b in zip(nodes, nodes[1:], strict=False):
            image.connect(a, "value", b, "value")
        study.add_nodes([image])
    return study


def _order(tmp_path, plugin_name: str, **plugin_args) -> list[tuple[str, str]]:
    names = ("t1w_a_wf", "t1w_b_wf", "t1w_c_wf")
    images = {name: Path(f"{name}.nii.gz") for name in names}
    started: list[tuple[str, str]] = []

    def record(node, status):
        if status == "start":
            started.append((node.fullname.split(".")[1], node.name))

    plugin_args["status_callback"] = record
    plugin = image_order_plugin(plugin_name, images, plugin_args)
    assert plugin is not None
    _study(tmp_path, names).run(plugin=plugin)
    plain: list[tuple[str, str]] = []
    plugin_args["status_callback"] = lambda node, status: (
        plain.append((node.fullname.split(".")[1], node.name)) if status == "start" else None
    )
    _study(tmp_path / "plain", names).run(plugin=plugin_name, plugin_args=plugin_args)
    return started, plain


@pytest.mark.parametrize(
    ("plugin", "args"),
    [("Linear", {}), ("MultiProc", {"n_procs": 1, "mp_context": "forkserver"})],
)
def test_images_are_taken_in_turn(tmp_path, plugin, args):
    """Each image's chain runs before the next image's: a killed run keeps what it finished."""
    ours, plain = _order(tmp_path, plugin, **args)
    expected = [(wf, step) for wf in ("t1w_a_wf", "t1w_b_wf", "t1w_c_wf") for step in STEPS]
    assert ours == expected
    # nipype's own order runs each step for every image first: nothing finishes until the end
    assert plain != expected and sorted(plain) == sorted(expected)
    assert [step for _, step in plain[:3]] == ["reorient"] * 3


def test_multiproc_collections_leave_out_what_lived_before_the_run(tmp_path, monkeypatch):
    """nipype's MultiProc runs a full garbage collection before every scheduling pass: ours
    runs each of them with the objects alive at the start frozen, and unfreezes them after."""
    import gc

    frozen: list[int] = []
    collect = gc.collect

    def recording_collect(*args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return collect(*args, **kwargs)

    names = ("t1w_a_wf", "t1w_b_wf")
    plugin = image_order_plugin(
        "MultiProc", {n: Path(f"{n}.nii.gz") for n in names}, {"n_procs": 1}
    )
    before = gc.get_freeze_count()
    monkeypatch.setattr(gc, "collect", recording_collect)
    _study(tmp_path, names).run(plugin=plugin)
    monkeypatch.undo()
    assert len(frozen) >= len(names) * len(STEPS)
    assert min(frozen) > before + 1000  # the libraries, nipype's graph: all left out
    assert gc.get_freeze_count() == before


def test_garbage_made_during_the_run_is_still_collected():
    import gc
    import weakref

    class Cycle:
        pass

    with collections_of_new_objects_only():
        assert gc.get_freeze_count() > 0
        made = Cycle()
        made.me = made
        ref = weakref.ref(made)
        del made
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0


def test_what_a_stop_breaks_is_not_an_images_failure():
    """A node run in the launcher when SIGTERM comes fails with the stop, and the workers that
    stop_workers ends leave broken tasks: neither is reported as an image's failure."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool
    from types import SimpleNamespace

    from dlmuse_bids.runner.core import StopRequest

    seen, stop = [], StopRequest()
    plugin = image_order_plugin(
        "MultiProc",
        {"t1w_a_wf": Path("a.nii.gz")},
        {"status_callback": lambda node, status: seen.append(status), "n_procs": 1},
        stop,
    )
    mosaic = SimpleNamespace(fullname="dlmuse_bids_wf.t1w_a_wf.mosaic")
    plugin._status_callback(mosaic, "exception")  # before the stop: the image's own failure
    stop.signum = signal.SIGTERM
    plugin._status_callback(mosaic, "exception")
    plugin._status_callback(mosaic, "end")
    assert seen == ["exception", "end"]
    broken = Future()
    broken.set_exception(BrokenProcessPool("a worker was ended"))
    with pytest.raises(BrokenProcessPool):
        plugin._async_callback(broken)
    plugin.stopping = True
    plugin._async_callback(broken)  # concurrent.futures would log its traceback
    plugin.pool.shutdown()


def _nap(value, seconds):
    import time

    time.sleep(seconds)
    return value


def test_this_processs_nodes_run_while_the_workers_are_busy(tmp_path):
    """An image's sinks (nodes run in the launching process) run beside the next image's
    network, which holds every processor: they do not wait for it to end, nor does it for them.
    """
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    study = pe.Workflow(name="dlmuse_bids_wf", base_dir=str(tmp_path))
    study.config["execution"]["poll_sleep_duration"] = 0.1
    names = ("t1w_a_wf", "t1w_b_wf")
    for name, seconds in zip(names, (0.1, 4.0), strict=True):
        image = pe.Workflow(name=name)
        nap = Function(input_names=["value", "seconds"], output_names=["value"], function=_nap)
        network = pe.Node(nap, name="network", n_procs=2)
        network.inputs.value, network.inputs.seconds = name, seconds
        sinks = [
            pe.Node(
                Function(input_names=["value"], output_names=["value"], function=_step),
                name=f"sink{i}",
                run_without_submitting=True,
            )
            for i in (1, 2)
        ]
        image.connect([(network, sinks[0], [("value", "value")])])
        image.connect([(sinks[0], sinks[1], [("value", "value")])])
        study.add_nodes([image])
    seen: list[tuple[str, str, str]] = []
    plugin = image_order_plugin(
        "MultiProc",
        {name: Path(f"{name}.nii.gz") for name in names},
        {
            "n_procs": 2,
            "mp_context": "forkserver",
            "status_callback": lambda n, s: seen.append((n.fullname.split(".")[1], n.name, s)),
        },
    )
    study.run(plugin=plugin)
    # b's network is given out before a's first sink runs, in the same pass
    assert seen.index(("t1w_b_wf", "network", "start")) < seen.index(("t1w_a_wf", "sink1", "end"))
    # nipype's own pass gives out nothing while the workers hold every processor: a's second
    # sink would wait the 4 s of b's network
    assert seen.index(("t1w_a_wf", "sink2", "end")) < seen.index(("t1w_b_wf", "network", "end"))
    assert seen[-1] == ("t1w_b_wf", "sink2", "end")


def test_one_failing_image_does_not_stop_the_others(tmp_path):
    names = ("t1w_a_wf", "t1w_b_wf")
    images = {name: Path(f"{name}.nii.gz") for name in names}
    ended: list[tuple[str, str, str]] = []
    plugin = image_order_plugin(
        "Linear",
        images,
        {"status_callback": lambda n, s: ended.append((n.fullname.split(".")[1], n.name, s))},
    )
    study = _study(tmp_path, names, failing="t1w_a_wf")
    study.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
    with pytest.raises(Exception, match="this image fails|did not execute cleanly"):
        study.run(plugin=plugin)
    assert ("t1w_a_wf", "reorient", "exception") in ended
    assert ("t1w_b_wf", "sink", "end") in ended
    assert ("t1w_a_wf", "sink", "start") not in ended


def test_a_stop_is_not_taken_for_a_node_failure(tmp_path, monkeypatch):
    """A signal's Stopped inside a node nipype runs here becomes that node's failure; the
    plugin sees the request and stops instead of going on to the next image."""
    from dlmuse_bids.runner import Stopped, StopRequest

    names = ("t1w_a_wf", "t1w_b_wf")
    request, started = StopRequest(), []

    def record(node, status):
        if status == "start":
            started.append(node.fullname)
            request.signum = signal.SIGTERM  # what the handler notes before it raises

    plugin = image_order_plugin(
        "Linear",
        {name: Path(f"{name}.nii.gz") for name in names},
        {"status_callback": record},
        request,
    )
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path, names, stopping="t1w_a_wf")
    study.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
    with pytest.raises(Stopped) as stopped:
        study.run(plugin=plugin)
    assert stopped.value.exit_code == 143
    assert started == ["dlmuse_bids_wf.t1w_a_wf.reorient"]  # image b never started
    assert Path.cwd() == tmp_path  # nipype's chdir into the node folder is undone


def test_other_plugins_are_nipypes_own():
    assert image_order_plugin("SLURM", {}, {}) is None
    assert image_order_plugin("SLURMGraph", {}, {}) is None


def test_local_plugins_get_images_in_batches():
    todo = [Path(f"sub-{i:04d}_T1w.nii.gz") for i in range(450)]
    assert [len(b) for b in workflow_batches(todo, "Linear", 1)] == [200, 200, 50]
    assert [len(b) for b in workflow_batches(todo, "MultiProc", 16)] == [400, 50]
    assert [p for b in workflow_batches(todo, "MultiProc", 2) for p in b] == todo
    assert [len(b) for b in workflow_batches(todo, "SLURM", 2)] == [450]  # all in its queue
    assert workflow_batches([], "Linear", 1) == []
