"""Robustness end to end: bad inputs refused one by one, killed and parallel runs lose nothing.

Every run goes through ``dlmuse-bids`` with the tiny random-weight models on small BIDS datasets
made from the real scans; every test checks that the input dataset is left byte for byte as it
was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids.bids import figure_paths, output_paths
from dlmuse_bids.cli.common import EXIT_SOME_FAILED
from dlmuse_bids.locks import holder
from tests.conftest import needs_shared
from tests.support.bids import STANDARD_T1W, make_dataset, run_app, tree_digest, write_scan
from tests.test_io import REFUSED

pytestmark = needs_shared

FAST = ["--no-tta", "--device", "cpu", "--skip-bids-validation"]
GOOD = ("sub-good/anat/sub-good_T1w.nii.gz", STANDARD_T1W[3][1])

#: The refusals the issue lists, as cases of tests/test_io.py's REFUSED table (builder, reason).
BAD = {
    "gzip": "gzip-truncated",
    "empty": "zero-byte",
    "flat": "2d",
    "multi": "4d-several",
    "zeros": "all-zero",
    "nan": "nan",
    "inf": "inf",
    "zerovox": "zero-voxel",
    "coarse": "coarse-voxel",
    "small": "small",
    "broken": "broken-symlink",
}
UNREADABLE = "unread"


def _place_bad_input(raw: Path, label: str, case: str, scratch: Path) -> Path:
    """Build REFUSED[case] in ``scratch`` and put it where sub-<label>'s T1w belongs."""
    target = raw / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    target.parent.mkdir(parents=True)
    made = REFUSED[case][0](scratch)
    if made.is_symlink():  # dangling: point the dataset's link at a file that does not exist
        target.symlink_to(raw / "sourcedata" / "gone.nii.gz")
    else:
        shutil.move(made, target)
    return target


@pytest.fixture(scope="module")
def refused_run(tiny_models, tmp_path_factory):
    """One participant run over a good image and one image per kind of bad input."""
    raw = make_dataset(tmp_path_factory.mktemp("raw") / "ds", [GOOD])
    bad = {}
    for label, case in BAD.items():
        scratch = tmp_path_factory.mktemp(label)
        bad[label] = (_place_bad_input(raw, label, case, scratch), REFUSED[case][2])
    unreadable = write_scan(raw, f"sub-{UNREADABLE}/anat/sub-{UNREADABLE}_T1w.nii.gz", GOOD[1])
    bad[UNREADABLE] = (unreadable, "permission denied")
    out = tmp_path_factory.mktemp("deriv") / "dlmuse"
    with pytest.MonkeyPatch.context() as mp:
        # chmod 000 does not stop root; the Linear plugin runs every node in this process
        read_bytes = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self.name == unreadable.name:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return read_bytes(self)

        mp.setattr(Path, "read_bytes", denied)
        err = io.StringIO()  # capsys is per test; this run is shared by the module
        mp.setattr(sys, "stderr", err)
        code = run_app(raw, out, *FAST, "--nipype-plugin", "Linear", models=tiny_models)
    group = run_app(raw, out, models=tiny_models, level="group")
    return {
        "raw": raw,
        "out": out,
        "code": code,
        "err": err.getvalue(),
        "bad": bad,
        "group": group,
    }


def test_bad_inputs_fail_one_by_one_with_their_reason(refused_run):
    out, err = refused_run["out"], refused_run["err"]
    assert refused_run["code"] == EXIT_SOME_FAILED
    assert output_paths(refused_run["raw"] / GOOD[0], out)["dseg"].is_file()
    n = len(refused_run["bad"])
    assert f"1 processed, 0 skipped (outputs up to date), {n} failed" in err
    failed = [ln for ln in err.splitlines() if ln.startswith("dlmuse-bids: failed: ")]
    assert len(failed) == n
    for label, (path, reason) in refused_run["bad"].items():
        line = f"dlmuse-bids: failed: {path}: "
        hits = [ln for ln in failed if ln.startswith(line)]
        assert len(hits) == 1, (label, failed)
        assert reason.lower() in hits[0].lower(), (label, hits[0])
        crashes = list((out / "logs").glob(f"crash-*-sub-{label}_T1w-*.txt"))
        assert len(crashes) == 1, label
        assert reason.lower() in crashes[0].read_text().lower(), label
        assert not list(out.glob(f"sub-{label}/**/*_dseg.nii.gz")), label


def test_group_table_lists_every_refused_image(refused_run):
    assert refused_run["group"] == 0
    table = pd.read_csv(refused_run["out"] / "group" / "dlmuse_volumes.tsv", sep="\t")
    status = dict(zip(table["participant_id"], table["status"], strict=True))
    assert status.pop("sub-good") == "ok"
    assert status == {f"sub-{label}": "failed" for label in refused_run["bad"]}


# -- runs that must lose nothing ---------------------------------------------------------------
FOUR = [
    (f"sub-{label}/anat/sub-{label}_T1w.nii.gz", scan)
    for label, (_, scan) in zip(("a", "b", "c", "d"), STANDARD_T1W[1:5], strict=True)
]
TWO, THREE = FOUR[:2], FOUR[:3]


def _app_command(raw: Path, out: Path, models: Path, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name("dlmuse-bids")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    return [str(exe), str(raw), str(out), "participant", "--model-dir", str(models), *FAST, *extra]


def _final_files(out: Path) -> list[Path]:
    """Every file under a final name: no hidden temporary, nothing in a hidden folder."""
    return [
        p
        for p in sorted(out.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
    ]


def assert_complete(path: Path) -> None:
    """Read ``path`` the way its format demands, to the last byte."""
    name = path.name
    if name.endswith((".nii.gz", ".nii")):
        np.asarray(nib.load(path).dataobj)  # gzip checks its CRC and length at the end
    elif name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith((".tsv", ".csv")):
        pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    elif name.endswith(".png"):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-8:-4] == b"IEND", path
    elif name.endswith(".html"):
        assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), path
    else:
        assert path.stat().st_size > 0, path


def _done(raw: Path, out: Path, files) -> set[str]:
    """Images whose every output exists, their mosaic (the last file) included."""
    return {
        rel
        for rel, _ in files
        if all(p.exists() for key, p in output_paths(raw / rel, out).items() if key != "xfm")
        and all(p.exists() for p in figure_paths(raw / rel, out).values())
    }


def test_sigkill_halfway_loses_nothing_and_the_rerun_finishes_the_rest(tiny_models, tmp_path):
    raw = make_dataset(tmp_path / "raw", THREE)
    before = tree_digest(raw)
    out = tmp_path / "out"
    cmd = _app_command(raw, out, tiny_models, "--nipype-plugin", "Linear")
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not _done(raw, out, THREE) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = _done(raw, out, THREE)
    assert 1 <= len(done) < len(THREE)
    for path in _final_files(out):
        assert_complete(path)
    kept = {
        p: p.stat().st_mtime_ns
        for rel in done
        for p in output_paths(raw / rel, out).values()
        if p.exists()
    }
    rerun = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    n_done = len(done)
    assert (
        f"{3 - n_done} processed, {n_done} skipped (outputs up to date), 0 failed" in rerun.stderr
    )
    assert _done(raw, out, THREE) == {rel for rel, _ in THREE}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished outputs were rewritten"
    for path in _final_files(out):
        assert_complete(path)
    assert tree_digest(raw) == before


def _marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (the run and every worker it made)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker.encode() in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    ("plugin", "own_work_dir"),
    [("MultiProc", False), ("MultiProc", True), ("Linear", False)],
    ids=["temporary-work-dir", "user-w", "linear"],
)
def test_sigterm_stops_workers_says_what_finished_and_exits_143(
    tiny_models, tmp_path, plugin, own_work_dir
):
    """What ``scancel``, ``docker stop`` and Kubernetes do first: SIGTERM to the app alone."""
    raw = make_dataset(tmp_path / "raw", THREE)
    before = tree_digest(raw)
    out, tmp, work = tmp_path / "out", tmp_path / "tmp", tmp_path / "work"
    tmp.mkdir()
    marker = f"DLMUSE_TEST_RUN={tmp_path.name}"
    env = {**os.environ, "TMPDIR": str(tmp), marker.split("=")[0]: marker.split("=")[1]}
    extra = ["-w", str(work)] if own_work_dir else []
    cmd = _app_command(raw, out, tiny_models, "--nprocs", "2", "--nipype-plugin", plugin, *extra)
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not _done(raw, out, THREE) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to the app's own process only, as docker stop does
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    done = _done(raw, out, THREE)
    assert 1 <= len(done) < len(THREE), "the signal came after the run had finished"
    assert "stopped by SIGTERM" in err
    n_done = len(done)
    assert (
        f"{n_done} processed, 0 skipped (outputs up to date), 0 failed, "
        f"{3 - n_done} not finished (stopped)" in err
    )
    assert "Traceback" not in err
    assert _marked_processes(marker) == [], "a worker outlived the run"
    assert not [p for p in out.rglob("*.tmp")], "temporary files left behind"
    for path in _final_files(out):
        assert_complete(path)
    assert sorted(p.name for p in tmp.iterdir()) == [], "the temporary work directory is left"
    assert work.is_dir() is own_work_dir  # a user's -w is theirs: kept for a rerun
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{3 - n_done} processed, {n_done} skipped (outputs up to date)" in rerun.stderr
    assert _done(raw, out, THREE) == {rel for rel, _ in THREE}
    assert tree_digest(raw) == before


def test_sigterm_stops_dlmuse_run_after_the_image_in_hand(tiny_models, tmp_path):
    """``dlmuse run`` too: finished images stay whole, the rest are said, exit 143."""
    from dlmuse_bids.runner import nifti_outputs

    exe = Path(sys.executable).with_name("dlmuse")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    src = tmp_path / "in"
    src.mkdir()
    inputs = [write_scan(src, f"scan{i}_T1w.nii.gz", scan) for i, (_, scan) in enumerate(FOUR)]
    before = tree_digest(src)
    out = tmp_path / "out"
    cmd = [str(exe), "run", *map(str, inputs), "-o", str(out), "--model-dir", str(tiny_models)]
    cmd += ["--no-tta", "--device", "cpu"]

    def finished() -> list[Path]:
        return [p for p in inputs if all(f.exists() for f in nifti_outputs(out, p).values())]

    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while not finished() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    done = finished()
    assert 1 <= len(done) < len(inputs)
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert f"{len(done)} processed, 0 skipped" in err
    assert f"{len(inputs) - len(done)} not finished (stopped)" in err
    assert not [p for p in out.rglob("*.tmp")] and not [p for p in out.rglob(".*")]
    for path in _final_files(out):
        assert_complete(path)
    rerun = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(inputs) - len(done)} processed, {len(done)} skipped" in rerun.stderr
    assert tree_digest(src) == before


def _group_status(raw: Path, out: Path) -> dict[str, str]:
    """``dlmuse-bids group`` now: each image's status in the group volume table."""
    exe = Path(sys.executable).with_name("dlmuse-bids")
    cmd = [str(exe), str(raw), str(out), "group", "--skip-bids-validation"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t", keep_default_na=False)
    return dict(zip(table["source"], table["status"], strict=True))


def test_the_same_images_twice_at_once_have_one_writer(tiny_models, tmp_path):
    """A second launch on images a first run holds leaves them to it, and says so (exit 75).

    The group level, run while the first run is frozen mid-image, lists the images it holds as
    missing (not failed) and reads only the finished ones; run again later, it has them all.
    """
    raw = make_dataset(tmp_path / "raw", THREE)
    before = tree_digest(raw)
    out = tmp_path / "out"
    cmd = _app_command(raw, out, tiny_models)
    first = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:

        def written() -> set[str]:  # every output there, and let go of by the first run
            return {
                rel
                for rel in _done(raw, out, THREE)
                if holder(out, output_paths(raw / rel, out)["dseg"].name) is None
            }

        deadline = time.monotonic() + 600
        while not written() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, its locks held
        done = written()
        assert 1 <= len(done) < len(THREE), "the first run finished before it was paused"
        try:
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            during = _group_status(raw, out)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    n = len(done)
    assert second.returncode == 75, second.stderr
    assert (
        f"0 processed, {n} skipped (outputs up to date), 0 failed, {3 - n} left to another run"
        in second.stderr
    )
    assert f"being segmented by another run (pid {first.pid} on " in second.stderr
    assert first.returncode == 0, first_err
    assert "3 processed, 0 skipped (outputs up to date), 0 failed" in first_err
    assert _done(raw, out, THREE) == {rel for rel, _ in THREE}
    assert during == {rel: "ok" if rel in done else "missing" for rel, _ in THREE}
    assert _group_status(raw, out) == {rel: "ok" for rel, _ in THREE}
    assert not [p for p in out.rglob("*.tmp")]
    for path in _final_files(out):
        assert_complete(path)
    single = tmp_path / "single"
    alone = subprocess.run(
        _app_command(raw, single, tiny_models), capture_output=True, check=False
    )
    assert alone.returncode == 0
    for rel, _ in THREE:
        ours, theirs = output_paths(raw / rel, out), output_paths(raw / rel, single)
        assert ours["volumes"].read_bytes() == theirs["volumes"].read_bytes()
        a, b = (np.asarray(nib.load(p["dseg"]).dataobj) for p in (ours, theirs))
        assert np.array_equal(a, b)
    assert tree_digest(raw) == before


def test_two_processes_share_one_output_dir(tiny_models, tmp_path):
    """Disjoint participants, one output dir, at the same time: both complete, nothing torn."""
    from dlmuse_bids.bids import DSEG_TSV
    from dlmuse_bids.labels import dseg_table

    raw = make_dataset(tmp_path / "raw", TWO)
    before = tree_digest(raw)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            _app_command(raw, out, tiny_models, "--participant-label", *labels),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for labels in (("a",), ("b",))
    ]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    for err in errs:
        assert "1 processed, 0 skipped (outputs up to date), 0 failed" in err
    assert _done(raw, out, TWO) == {rel for rel, _ in TWO}
    for path in _final_files(out):
        assert_complete(path)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    expected = dseg_table().to_csv(sep="\t", index=False, lineterminator="\n")
    assert (out / DSEG_TSV).read_text(encoding="utf-8") == expected
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert len(ignore) == len(set(ignore))
    assert not [p for p in out.rglob(".*.tmp")], "temporary files left behind"
    assert run_app(raw, out, models=tiny_models, level="group") == 0
    assert tree_digest(raw) == before


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a real 256 KiB tmpfs, or None where this user may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_clearly_and_leaves_no_partial_file(
    tiny_models, tmp_path, small_disk, monkeypatch, capsys
):
    """Outputs on a full file system: each write that does not fit fails, named, whole or not
    at all; once there is room, a rerun completes the rest."""
    raw = make_dataset(tmp_path / "raw", THREE)
    args = ["--nipype-plugin", "Linear"]
    if small_disk is not None:
        out = small_disk / "dlmuse"
    else:  # no mount allowed: a 256 KiB budget on the app's own writes
        import dlmuse_bids.atomic as dlio

        out = tmp_path / "out"
        real = dlio._write_atomic
        used = [0]

        def budget(final: Path, payload: bytes) -> None:
            used[0] += len(payload)
            if used[0] > 256 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
            real(final, payload)

        monkeypatch.setattr(dlio, "_write_atomic", budget)
    code = run_app(raw, out, *FAST, *args, models=tiny_models)
    err = capsys.readouterr().err
    assert code != 0
    full = [ln for ln in err.splitlines() if "No space left on device" in ln]
    assert full, err
    assert all(str(out) in ln for ln in full), full
    assert _done(raw, out, THREE) != {rel for rel, _ in THREE}
    for path in _final_files(out):
        assert_complete(path)
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    if small_disk is not None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    else:
        monkeypatch.undo()
    assert run_app(raw, out, *FAST, *args, models=tiny_models) == 0
    assert _done(raw, out, THREE) == {rel for rel, _ in THREE}
    for path in _final_files(out):
        assert_complete(path)


# -- datasets as people get them --------------------------------------------------------------
VALIDATED = ["--no-tta", "--device", "cpu"]  # validated when bids-validator-deno is installed


def _annex(raw: Path, t1w: Path, present: bool) -> Path:
    """Make ``t1w`` what DataLad leaves: a link into .git/annex/objects, content there or not."""
    import hashlib

    key = f"MD5E-s{t1w.stat().st_size}--{hashlib.md5(t1w.read_bytes()).hexdigest()}.nii.gz"
    obj = raw / ".git" / "annex" / "objects" / key[6:8] / key[8:10] / key / key
    obj.parent.mkdir(parents=True)
    if present:
        t1w.rename(obj)
        obj.chmod(0o444)  # git-annex makes contents and their folders read-only
        obj.parent.chmod(0o555)
    else:
        t1w.unlink()
    t1w.symlink_to(os.path.relpath(obj, t1w.parent))
    return obj


def test_a_datalad_dataset_runs_what_is_fetched_and_names_what_is_not(
    tiny_models, tmp_path, capsys
):
    """OpenNeuro datasets arrive through DataLad: links to git-annex objects, fetched or not."""
    raw = make_dataset(tmp_path / "raw", THREE)
    t1w = {label: raw / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz" for label in "abc"}
    _annex(raw, t1w["a"], present=True)
    _annex(raw, t1w["b"], present=False)
    out = tmp_path / "out"
    assert run_app(raw, out, "--list-participants", models=tiny_models) == 0
    assert capsys.readouterr().out.split() == ["a", "b", "c"]
    assert run_app(raw, out, *VALIDATED, models=tiny_models) == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "2 processed, 0 skipped (outputs up to date), 1 failed" in err
    assert f"{t1w['b']}: content not downloaded (git-annex): run `datalad get {t1w['b']}`" in err
    assert _done(raw, out, THREE) == {rel for rel, _ in THREE if "sub-b" not in rel}
    assert run_app(raw, out, models=tiny_models, level="group") == 0
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t")
    assert table["status"].tolist() == ["ok", "failed", "ok"]


def test_output_inside_the_input_is_never_taken_for_input(tiny_models, tmp_path, capsys):
    """The README's own layout, ``bids_dir/derivatives/dlmuse``, beside fMRIPrep's outputs.

    run_app checks that nothing in the input but ``derivatives/dlmuse`` changes."""
    raw = make_dataset(tmp_path / "raw", TWO)
    fmriprep = raw / "derivatives" / "fmriprep"
    fmriprep.mkdir(parents=True)
    description = {
        "Name": "fMRIPrep outputs",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}],
    }
    (fmriprep / "dataset_description.json").write_text(json.dumps(description))
    for rel in ("sub-a/anat/sub-a_desc-preproc_T1w.nii.gz", "sub-a/anat/sub-a_T1w.nii.gz"):
        write_scan(fmriprep, rel, TWO[0][1])
    out = raw / "derivatives" / "dlmuse"
    assert run_app(raw, out, *VALIDATED, models=tiny_models) == 0
    assert "2 processed, 0 skipped (outputs up to date), 0 failed" in capsys.readouterr().err
    segmented = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_dseg.nii.gz"))
    assert segmented == [
        "sub-a/anat/sub-a_seg-DLMUSE_dseg.nii.gz",
        "sub-b/anat/sub-b_seg-DLMUSE_dseg.nii.gz",
    ]
    assert run_app(raw, out, *VALIDATED, models=tiny_models) == 0  # validated with them inside
    assert "0 processed, 2 skipped (outputs up to date), 0 failed" in capsys.readouterr().err
    assert run_app(raw, out, models=tiny_models, level="group") == 0
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t")
    assert table["source"].tolist() == [rel for rel, _ in TWO]


# -- inputs that must be segmented the same ----------------------------------------------------
PLAIN_SCAN = "sub-colin27_T1w.nii.gz"  # 1 mm, RAS, uint8, sform and qform set and equal


def _plain(step: int = 2) -> nib.Nifti1Image:
    """The plain scan, every ``step``-th voxel (2: the tiny models' own 2 mm grid)."""
    from tests.support.bids import subsampled

    img = subsampled(PLAIN_SCAN, step)
    data = np.asarray(img.dataobj)
    out = nib.Nifti1Image(data, img.affine)
    out.set_data_dtype(data.dtype)
    out.set_sform(img.affine, 1)
    out.set_qform(img.affine, 1)
    return out


def _with_codes(img: nib.Nifti1Image, sform: int, qform: int, qshift: float = 0.0):
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_data_dtype(img.get_data_dtype())
    moved = img.affine.copy()
    moved[:3, 3] += qshift
    out.set_sform(img.affine, sform)
    out.set_qform(moved, qform)
    return out


def _as_dtype(img: nib.Nifti1Image, dtype, slope=1.0, inter=0.0, big=False):
    stored = ((np.asarray(img.dataobj, dtype=np.float64) - inter) / slope).astype(dtype)
    hdr = img.header.copy()
    if big:
        hdr = hdr.as_byteswapped(">")
    out = nib.Nifti1Image(stored, img.affine, hdr)
    out.set_data_dtype(np.dtype(dtype).newbyteorder(">" if big else "<"))
    out.header.set_slope_inter(slope, inter)
    return out


def _single_volume_4d(img: nib.Nifti1Image) -> nib.Nifti1Image:
    out = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine, img.header.copy())
    return out


def _oblique(img: nib.Nifti1Image, degrees: float = 15.0) -> nib.Nifti1Image:
    """The same voxels placed by an affine rotated ``degrees`` about the scanner's z axis."""
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    affine = rot @ img.affine
    out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
    out.set_data_dtype(img.get_data_dtype())
    out.set_sform(affine, 1)
    out.set_qform(affine, 1)
    return out


def _then(*steps):
    def build(img):
        for step in steps:
            img = step(img)
        return img

    return build


#: (label, how to build it from the plain scan, file suffix): every one holds the plain scan's
#: voxel values on a grid that maps voxel for voxel (axes permuted/flipped at most), so its
#: labels must be the plain labels at the same physical places, exactly. Each image combines a
#: few properties (orientation, header, storage) to keep the run short.
LOSSLESS = {
    "lpsfloat64": (
        _then(lambda img: _reoriented(img, (0, 1, 2), (0, 1)), lambda i: _as_dtype(i, np.float64)),
        ".nii",
    ),
    "liaint16": (
        _then(
            lambda img: _reoriented(img, (0, 2, 1), (0, 1)),
            lambda i: _as_dtype(i, np.int16, slope=0.5, inter=-20.0),
        ),
        ".nii.gz",
    ),
    "psrbigendian": (
        _then(
            lambda img: _reoriented(img, (1, 2, 0), (0,)),
            lambda i: _as_dtype(i, np.int16, big=True),
        ),
        ".nii.gz",
    ),
    "oblique4d": (_then(_oblique, lambda i: _with_codes(i, 1, 0), _single_volume_4d), ".nii.gz"),
    "qformonly": (lambda img: _with_codes(img, 0, 1), ".nii.gz"),
    "disagree": (lambda img: _with_codes(img, 2, 1, qshift=12.0), ".nii.gz"),
}


def _reoriented(img, perm, flips):
    from tests.support.geometry import reoriented as reorient

    out = reorient(img, perm, flips)
    out.set_data_dtype(img.get_data_dtype())
    return out


@pytest.fixture(scope="module")
def variants_run(tiny_models, tmp_path_factory):
    raw = make_dataset(tmp_path_factory.mktemp("raw") / "ds", [])
    plain = _plain()
    sources = {"plain": raw / "sub-plain" / "anat" / "sub-plain_T1w.nii.gz"}
    sources["plain"].parent.mkdir(parents=True)
    nib.save(plain, sources["plain"])
    for label, (build, suffix) in LOSSLESS.items():
        path = raw / f"sub-{label}" / "anat" / f"sub-{label}_T1w{suffix}"
        path.parent.mkdir(parents=True)
        nib.save(build(plain), path)
        sources[label] = path
    out = tmp_path_factory.mktemp("deriv") / "dlmuse"
    code = run_app(raw, out, *FAST, "--nprocs", "2", "--omp-nthreads", "1", models=tiny_models)
    return {"code": code, "out": out, "sources": sources}


@pytest.mark.parametrize("label", list(LOSSLESS))
def test_lossless_variants_give_the_plain_labels(variants_run, label):
    from tests.support.geometry import world_labels

    assert variants_run["code"] == 0
    out, sources = variants_run["out"], variants_run["sources"]
    plain_paths, paths = output_paths(sources["plain"], out), output_paths(sources[label], out)
    reference = nib.load(plain_paths["dseg"])
    variant = nib.load(paths["dseg"])
    source = nib.load(sources[label])
    assert variant.shape == source.shape[:3]  # a single-volume 4-D source gives 3-D outputs
    assert np.allclose(variant.affine, source.affine, atol=1e-5)
    if label == "oblique4d":  # same voxels, other placement: the same labels voxel for voxel
        same = np.asarray(variant.dataobj)
    else:
        same = world_labels(paths["dseg"], reference)
    assert np.array_equal(same, np.asarray(reference.dataobj))
    plain_vol = pd.read_csv(plain_paths["volumes"], sep="\t")
    vol = pd.read_csv(paths["volumes"], sep="\t")
    assert np.allclose(vol["volume_mm3"], plain_vol["volume_mm3"], rtol=0, atol=1e-6)
    meta = json.loads(paths["dseg_json"].read_text())
    geometry = meta["SourceGeometry"]
    expected = {"qformonly": "qform"}
    assert geometry["AffineSource"] == expected.get(label, "sform")
    assert ("Note" in geometry) == (label == "disagree")


def test_a_chosen_volume_of_a_4d_file_is_segmented(tiny_models, tmp_path, capsys):
    """--t1w-volume picks one volume of a several-volume file; the sidecar records which."""
    from tests.support.bids import subsampled

    raw = make_dataset(tmp_path / "raw", [])
    scan = subsampled(GOOD[1])
    data = np.asarray(scan.dataobj)
    stack = np.stack([np.zeros_like(data), data, data // 2], axis=-1)
    source = raw / "sub-multi" / "anat" / "sub-multi_T1w.nii.gz"
    source.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(stack, scan.affine, scan.header), source)
    out = tmp_path / "out"
    args = [*FAST, "--nipype-plugin", "Linear"]
    assert run_app(raw, out, *args, models=tiny_models) == EXIT_SOME_FAILED
    assert "4-D with 3 volumes" in capsys.readouterr().err
    assert run_app(raw, out, *args, "--t1w-volume", "1", models=tiny_models) == 0
    paths = output_paths(source, out)
    meta = json.loads(paths["dseg_json"].read_text())
    assert meta["T1wVolume"] == 1 and meta["SourceGeometry"]["Volume"] == 1
    assert nib.load(paths["dseg"]).shape == data.shape
    # another volume is another result: the outputs are not taken as up to date
    assert run_app(raw, out, *args, "--t1w-volume", "2", models=tiny_models) == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    assert json.loads(paths["dseg_json"].read_text())["T1wVolume"] == 2


def _resampled(img: nib.Nifti1Image, zooms) -> nib.Nifti1Image:
    """The plain scan on a grid of ``zooms`` mm (trilinear), as a scanner would store it."""
    from nibabel.processing import resample_to_output

    out = resample_to_output(
        nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine),
        voxel_sizes=zooms,
        order=1,
    )
    data = np.clip(np.rint(np.asarray(out.dataobj)), 0, 255).astype(np.uint8)
    img2 = nib.Nifti1Image(data, out.affine)
    img2.set_sform(out.affine, 1)
    img2.set_qform(out.affine, 1)
    return img2


def _with_neck(img: nib.Nifti1Image, mm: int = 60, tissue: bool = True) -> nib.Nifti1Image:
    """The plain scan with ``mm`` more field of view below it, the affine moved so that the head
    stays where it was: neck and shoulders (soft tissue, a third of the brain's bright
    intensity, with noise, in an ellipse widening downwards) or, without ``tissue``, air."""
    data = np.asarray(img.dataobj)
    pad = int(round(mm / abs(img.affine[2, 2])))
    nx, ny = data.shape[:2]
    x, y = np.meshgrid(np.arange(nx) - nx / 2, np.arange(ny) - ny / 2, indexing="ij")
    level = np.percentile(data[data > 0], 99) / 3
    rng = np.random.default_rng(0)
    slices = []
    for k in range(pad):  # k = 0 is the bottom slice
        shoulders = 1 + 1.5 * max(0.0, 0.5 - k / pad)
        inside = (x / (0.22 * nx * shoulders)) ** 2 + (y / (0.2 * ny)) ** 2 < 1
        tissue_here = level + rng.normal(0, level / 10, x.shape)
        slices.append(np.where(inside & tissue, tissue_here, 0))
    neck = np.clip(np.stack(slices, axis=-1), 0, 255).astype(data.dtype)
    padded = np.concatenate([neck, data], axis=2)
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * pad
    out = nib.Nifti1Image(padded, affine)
    out.set_sform(affine, 1)
    out.set_qform(affine, 1)
    return out


#: Variants whose voxels are not the plain scan's: resampled grids and a wider field of view.
LOSSY = {
    "aniso12": lambda img: _resampled(img, (1.0, 1.0, 1.2)),
    "aniso3": lambda img: _resampled(img, (0.9, 0.9, 3.0)),
    "iso05": lambda img: _resampled(img, (0.5, 0.5, 0.5)),
    "iso15": lambda img: _resampled(img, (1.5, 1.5, 1.5)),
    "emptyfov": lambda img: _with_neck(img, tissue=False),
}


@pytest.fixture(scope="module")
def icv_of(tiny_models):
    """The pipeline's ICV mask of an image (DLICV, then the ICV component rule), on its grid.

    Only DLICV and the mask step: on a resampled grid DLMUSE's random classes are near-ties
    everywhere, so only the ICV can be compared; it is also what DLMUSE's crop follows.
    """
    from dlmuse_bids.models import find_model, load_trained_model
    from dlmuse_bids.pipeline import lps_zooms, mask_and_crop, to_native, to_reference_orientation
    from dlmuse_bids.settings import InferenceOptions

    options = InferenceOptions(num_threads=1, use_mirroring=False)
    dlicv = load_trained_model(find_model("DLICV", [tiny_models])).predictor(options)

    def icv(img: nib.Nifti1Image) -> nib.Nifti1Image:
        lps, _ = to_reference_orientation(img)
        data = np.asarray(lps.dataobj, dtype=np.float32)
        zooms = lps_zooms(lps)
        mask = mask_and_crop(data, dlicv.predict(data, zooms), zooms)[0]
        return to_native(mask, mask, img)[1]

    return icv


def _icv_against_plain(icv_of, tmp_path: Path, label: str, variant) -> tuple[float, float, float]:
    """ICV Dice and volume ratio of ``variant`` against the plain 1 mm scan, in physical space,
    and the fraction of the plain ICV that the variant's ICV covers."""
    from dlmuse_bids.io import load_t1w
    from tests.support.geometry import world_labels

    plain = _plain(step=1)
    for name, img in (("plain", plain), (label, variant(plain))):
        nib.save(img, tmp_path / f"{name}.nii.gz")
        source = load_t1w(tmp_path / f"{name}.nii.gz")  # through the loader, as in a run
        mask = icv_of(source)
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        nib.save(mask, tmp_path / f"{name}_mask.nii.gz")
    reference = nib.load(tmp_path / "plain_mask.nii.gz")
    ref = np.asarray(reference.dataobj) > 0
    here = world_labels(tmp_path / f"{label}_mask.nii.gz", reference) > 0
    dice = 2 * (ref & here).sum() / (ref.sum() + here.sum())
    variant_mask = nib.load(tmp_path / f"{label}_mask.nii.gz")
    voxel = float(np.prod(variant_mask.header.get_zooms()[:3]))
    ratio = np.count_nonzero(np.asarray(variant_mask.dataobj)) * voxel / ref.sum()
    covered = (ref & here).sum() / ref.sum()
    print(f"{label}: ICV Dice {dice:.4f}, volume ratio {ratio:.4f}, covers {covered:.4f}")
    return dice, ratio, covered


@pytest.mark.parametrize("label", list(LOSSY))
def test_resampled_and_wider_scans_give_the_same_icv(icv_of, tmp_path, label):
    """The ICV of a resampled scan, or of one with empty space added, is the plain scan's:
    in physical space (Dice) and in volume (1 %)."""
    dice, ratio, _ = _icv_against_plain(icv_of, tmp_path, label, LOSSY[label])
    assert dice > (0.999 if label == "emptyfov" else 0.95)
    assert abs(ratio - 1) < 0.01


def test_neck_and_shoulders_are_segmented_on_their_grid(icv_of, tmp_path):
    """A field of view down to the shoulders runs and keeps the whole head in the ICV.

    How much neck a model calls intracranial is the model's doing: the random-weight test model's
    "ICV" is an intensity blob whose threshold moves with the whole-image z-score that nnU-Net
    applies for DLICV (its plans normalise without a mask), so the neck makes it grow (volume
    ratio 1.48 and 97 % of the plain ICV covered, measured). Only the official weights can say
    how DLICV does on such scans.
    """
    _, _, covered = _icv_against_plain(icv_of, tmp_path, "neck", _with_neck)
    assert covered > 0.95


def test_file_names_with_spaces_and_non_ascii(tiny_models, tmp_path):
    """Not BIDS names, so through ``dlmuse run``: the same labels as the plain-named copy."""
    from dlmuse_bids.cli import dlmuse_main

    src = tmp_path / "in"
    src.mkdir()
    plain, odd = src / "sub-01_T1w.nii.gz", src / "Séance 2 – patient ü_T1w.nii.gz"
    nib.save(_plain(), plain)
    shutil.copyfile(plain, odd)
    out = tmp_path / "out"
    argv = ["run", str(plain), str(odd), "-o", str(out), "--model-dir", str(tiny_models)]
    assert dlmuse_main([*argv, "--no-tta"]) == 0
    segs = sorted(out.glob("*_DLMUSE.nii.gz"))
    assert len(segs) == 2 and any("Séance 2 – patient ü" in p.name for p in segs)
    a, b = (np.asarray(nib.load(p).dataobj) for p in segs)
    assert np.array_equal(a, b)
