"""The runner every entry point shares: plan (run / skip / refuse), outcomes, summary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dlmuse_bids.runner import Outcome, RunReport, plan_images, provenance
from dlmuse_bids.settings import ModelInfo, PipelineInference


def _plan(sources, current=(), overwrite=False):
    return plan_images(
        [Path(s) for s in sources],
        lambda p: p.name,  # outputs are named after the file name
        lambda p: p.name in current,
        overwrite,
        "rename one of them",
    )


def test_the_plan_runs_skips_and_refuses_in_input_order():
    plan = _plan(["/a/x.nii", "/a/y.nii", "/b/x.nii", "/a/z.nii"], current={"y.nii"})
    assert plan.todo == (Path("/a/x.nii"), Path("/a/z.nii"))
    assert [(o.source.as_posix(), o.status) for o in plan.known] == [
        ("/a/y.nii", "skipped"),
        ("/b/x.nii", "failed"),
    ]
    clash = plan.known[1].message
    assert clash == "/b/x.nii: same output names as /a/x.nii; rename one of them"


def test_overwrite_runs_what_is_current():
    plan = _plan(["/a/x.nii", "/a/y.nii"], current={"x.nii", "y.nii"}, overwrite=True)
    assert plan.todo == (Path("/a/x.nii"), Path("/a/y.nii")) and plan.known == ()


def test_a_claim_leaves_held_images_to_their_run_and_skips_what_it_finished(tmp_path):
    from dlmuse_bids.locks import ImageLocks
    from dlmuse_bids.runner.core import claim_images

    other, ours = ImageLocks(tmp_path, print), ImageLocks(tmp_path, print)
    assert other.take("y.nii") is None  # another run segments y
    finished = {"z.nii"}  # and finished z while this one planned
    plan = _plan(["/a/x.nii", "/a/y.nii", "/a/z.nii"])
    claimed = claim_images(plan, ours, lambda p: p.name, lambda p: p.name in finished, False)
    assert claimed.todo == (Path("/a/x.nii"),)
    assert [(o.source.name, o.status) for o in claimed.known] == [
        ("y.nii", "busy"),
        ("z.nii", "skipped"),
    ]
    assert "/a/y.nii: being segmented by another run (pid " in claimed.known[0].message
    assert set(ours.held) == {"x.nii"}  # z's lock is let go: nothing of it is written
    again = claim_images(
        plan, ImageLocks(tmp_path, print), lambda p: p.name, finished.__contains__, True
    )
    assert again.todo == (Path("/a/z.nii"),)  # with --overwrite: a finished image runs again
    assert [(o.source.name, o.status) for o in again.known] == [
        ("x.nii", "busy"),
        ("y.nii", "busy"),
    ]
    report = RunReport((Outcome(Path("/a/x.nii"), "processed"), *claimed.known), 2.0)
    lines = report.summary()
    assert lines[0] == (
        "1 processed, 1 skipped (outputs up to date), 0 failed, 1 left to another run, in 2 s"
    )
    assert lines[1] == f"busy: {claimed.known[0].message}"
    assert not report.failed


def test_the_summary_counts_and_names_each_failure():
    report = RunReport(
        (
            Outcome(Path("/a/x.nii"), "processed"),
            Outcome(Path("/a/y.nii"), "skipped"),
            Outcome(Path("/a/z.nii"), "failed", "not a NIfTI file", Path("/o/logs/z.txt")),
        ),
        seconds=12.4,
    )
    assert report.failed
    assert report.summary() == [
        "1 processed, 1 skipped (outputs up to date), 1 failed, in 12 s",
        "failed: /a/z.nii: not a NIfTI file [crash file: /o/logs/z.txt]",
    ]
    clean = RunReport((Outcome(Path("/a/x.nii"), "skipped"),), 1.0)
    assert not clean.failed


def test_a_submitted_run_says_how_to_check_it():
    report = RunReport((), 3.0, submitted=2, plugin="SLURMGraph")
    assert report.summary()[0].startswith("2 image(s) submitted with SLURMGraph; run this")
    assert not report.failed


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({}, True),
        ({"num_threads": 8}, True),  # threads never change a label
        ({"use_mirroring": False}, False),
        ({"tile_step_size": 0.75}, False),
        ({"precision": "bf16"}, False),
        ({"channels_last": True}, False),
    ],
)
@pytest.mark.parametrize("network", ["dlicv", "dlmuse"])
def test_provenance_follows_every_option_but_threads(change, same, network):
    models = {"DLICV": ModelInfo("DLICV", Path("/m/a"), (0,), {"fold_0": "ab"})}
    base = PipelineInference.preset("exact", device="cpu", num_threads=2)
    changed = replace(getattr(base, network), **change)
    if "num_threads" in change:  # one process runs both networks with the same threads
        other = replace(base, dlicv=changed, dlmuse=replace(base.dlmuse, **change))
    else:
        other = replace(base, **{network: changed})
    mine = provenance("1.0", other, models)
    assert provenance("1.0", base, models).matches(mine.metadata()) is same
