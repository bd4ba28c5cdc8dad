"""Running workflows with nipype: the order images are taken in."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlmuse_bids.execution import image_order_plugin

STEPS = ("reorient", "dlicv", "dlmuse", "sink")


def _step(value):
    if value == "fail":
        raise ValueError("this image fails")
    return value


def _study(base: Path, names: tuple[str, ...], failing: str = ""):
    """A workflow of one four-step chain per image, like the participant workflow."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    study = pe.Workflow(name="dlmuse_bids_wf", base_dir=str(base))
    for name in names:
        image = pe.Workflow(name=name)
        nodes = [
            pe.Node(
                Function(input_names=["value"], output_names=["value"], function=_step),
                name=step,
            )
            for step in STEPS
        ]
        nodes[0].inputs.value = "fail" if name == failing else name
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


def test_other_plugins_are_nipypes_own():
    assert image_order_plugin("SLURM", {}, {}) is None
    assert image_order_plugin("SLURMGraph", {}, {}) is None
