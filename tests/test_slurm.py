"""``dlmuse-bids`` on a real one-node SLURM cluster: job arrays and nipype's SLURM plugin.

``tools/slurm-cluster`` starts munged, slurmctld and slurmd on this machine (the Debian packages
slurm-wlm and munge, which ``.ci/run`` installs). A small dataset of three T1w images goes through
the README's array script (``tools/slurm-array.sbatch``) and through ``--nipype-plugin SLURM``;
both must give what a local run gives, image for image. Where the packages are missing the tests
skip, except in CI (``CI`` set), where they fail; a cluster that does not start fails with its
daemons' logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from dlmuse_bids.bids import output_paths
from dlmuse_bids.locks import ImageLocks
from dlmuse_bids.workflows import SINK_NODES
from tests.conftest import needs_shared
from tests.support.bids import STANDARD_T1W, make_dataset, tree_digest
from tests.support.outputs import assert_same_outputs

pytestmark = needs_shared

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm-cluster"
ARRAY_SCRIPT = REPO / "tools" / "slurm-array.sbatch"
FAST = ["--no-tta", "--device", "cpu", "--skip-bids-validation"]
LABELS = ("01", "02", "03")
THREE = [
    (f"sub-{label}/anat/sub-{label}_T1w.nii.gz", scan)
    for label, (_, scan) in zip(LABELS, STANDARD_T1W[1:4], strict=True)
]
#: What one array task may use on the 2-core test node (the script asks for more by default).
TASK = ["--cpus-per-task=1", "--mem=1G"]
#: Nodes that the SLURM plugin submits as jobs; the light ones run in the launcher.
SUBMITTED = ("reorient", "dlicv", "mask_crop", "dlmuse", "paste")


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: its folder and the environment its clients need."""

    root: Path
    env: dict[str, str]

    def run(self, *cmd, cwd: Path | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [str(c) for c in cmd], env=self.env, cwd=cwd, capture_output=True, text=True
        )
        if check and done.returncode:
            raise AssertionError(f"{cmd[0]} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld still knows (finished ones for 10 minutes), by job id."""
        out = self.run("squeue", "--states=all", "--noheader", "--format=%A|%i|%j|%T")
        jobs = {}
        for line in out.splitlines():
            job_id, name_id, name, state = line.strip().split("|")
            jobs[job_id] = {"id": name_id, "name": name, "state": state}
        return jobs

    def details(self, job_id: str) -> str:
        return self.run("scontrol", "--oneliner", "show", "job", job_id)

    def logs(self) -> str:
        return "\n".join(
            f"----- {p}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted((self.root / "log").glob("*"))
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        message = "slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs them")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(CLUSTER), "start", str(root)], capture_output=True, text=True)
    if started.returncode:
        subprocess.run([str(CLUSTER), "stop", str(root)], check=False)
        pytest.fail(f"the SLURM test cluster did not start:\n{started.stderr}")
    env = {
        **os.environ,
        "SLURM_CONF": str(root / "slurm.conf"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # no template: the template check is not what runs on the cluster here
        "TEMPLATEFLOW_HOME": str(tmp_path_factory.mktemp("no-templateflow")),
    }
    yield Cluster(root, env)
    subprocess.run([str(CLUSTER), "stop", str(root)], check=False)
    pids = [root / "slurmctld.pid", root / "slurmd.pid", root / "munge" / "munged.pid"]
    assert not [p for p in pids if p.exists()], "the cluster did not stop"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = make_dataset(tmp_path_factory.mktemp("raw") / "ds", THREE)
    return raw, tree_digest(raw)


def _app(raw: Path, out: Path, models: Path, *extra) -> list[str]:
    exe = Path(sys.executable).with_name("dlmuse-bids")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    return [str(exe), str(raw), str(out), "participant", "--model-dir", str(models), *extra]


@pytest.fixture(scope="module")
def local_out(cluster, dataset, tiny_models, tmp_path_factory):
    """The same dataset segmented on this machine, with the cluster runs' environment and their
    thread count (each job has one CPU): on some CPUs oneDNN's fp32 convolutions split their
    sums by thread too, so other thread counts may change a near-tie voxel of DLMUSE."""
    raw, _ = dataset
    out = tmp_path_factory.mktemp("local") / "out"
    done = subprocess.run(
        _app(raw, out, tiny_models, *FAST, "--omp-nthreads", "1"),
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def labels_file(cluster, dataset, tiny_models, tmp_path) -> Path:
    """``--list-participants`` into a file, as the README tells users to make it."""
    raw, _ = dataset
    out = tmp_path / "not-written"
    listed = subprocess.run(
        _app(raw, out, tiny_models, "--list-participants"),
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == list(LABELS)
    assert not out.exists(), "listing the participants wrote the output dir"
    path = tmp_path / "labels.txt"
    path.write_text(listed.stdout)
    return path


def _sbatch(cluster: Cluster, cwd: Path, *args) -> str:
    """Submit; the job id (with ``--wait``, once the job has ended)."""
    return cluster.run("sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]


def _array_args(raw: Path, out: Path, labels: Path, models: Path, *extra) -> list:
    return [ARRAY_SCRIPT, raw, out, labels, "--model-dir", models, *FAST, *extra]


def _tasks(cluster: Cluster, array_id: str) -> dict[str, dict[str, str]]:
    """The tasks of an array job by task index, each with its own job id."""
    return {
        job["id"].partition("_")[2]: {**job, "job_id": job_id}
        for job_id, job in cluster.jobs().items()
        if job["id"].startswith(f"{array_id}_")
    }


def test_array_job_gives_the_local_outputs(
    cluster, dataset, local_out, labels_file, tiny_models, tmp_path
):
    raw, digest = dataset
    out = tmp_path / "out"
    array_id = _sbatch(
        cluster, tmp_path, "--wait", "--array=0-2", *TASK,
        *_array_args(raw, out, labels_file, tiny_models),
    )  # fmt: skip
    tasks = _tasks(cluster, array_id)
    assert sorted(tasks) == ["0", "1", "2"], cluster.jobs()
    assert {t["state"] for t in tasks.values()} == {"COMPLETED"}
    assert len({t["job_id"] for t in tasks.values()}) == 3, "tasks did not run as separate jobs"
    for index, label in enumerate(LABELS):
        log = (tmp_path / f"dlmuse-bids-{array_id}_{index}.log").read_text()
        assert f"participant(s) {label}" in log
        assert "1 processed, 0 skipped (outputs up to date), 0 failed" in log, log
    assert_same_outputs(local_out, out, LABELS)
    # then the group level, from the finished outputs
    cmd = [*_app(raw, out, tiny_models)[:3], "group"]
    group = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True)
    assert group.returncode == 0, group.stderr
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t")
    assert dict(zip(table["participant_id"], table["status"], strict=True)) == {
        f"sub-{label}": "ok" for label in LABELS
    }
    assert tree_digest(raw) == digest


def _plugin_command(raw: Path, out: Path, models: Path, tmp: Path, plugin: str, *extra) -> list:
    """A run through one of nipype's SLURM plugins: 1 thread a network, a 30-minute limit."""
    plugin_args = json.dumps({"sbatch_args": "--time=30"})
    return _app(
        raw, out, models, *FAST, "--omp-nthreads", "1", "-w", tmp / "work", *extra,
        "--nipype-plugin", plugin, "--nipype-plugin-args", plugin_args,
    )  # fmt: skip


def test_nipype_slurm_plugin_submits_each_heavy_node(
    cluster, dataset, local_out, tiny_models, tmp_path
):
    raw, digest = dataset
    out = tmp_path / "out"
    before = set(cluster.jobs())
    cmd = _plugin_command(raw, out, tiny_models, tmp_path, "SLURM")
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + cluster.logs()
    assert "3 processed, 0 skipped (outputs up to date), 0 failed" in done.stderr
    jobs = {k: v for k, v in cluster.jobs().items() if k not in before}
    # nipype names a job <node>.<image workflow>.<workflow>.<user>
    assert sorted(job["name"].rsplit(".", 1)[0] for job in jobs.values()) == sorted(
        f"{node}.t1w_sub_{label}_T1w_wf.dlmuse_bids_wf" for node in SUBMITTED for label in LABELS
    )
    assert {job["state"] for job in jobs.values()} == {"COMPLETED"}
    dlicv = next(k for k, v in jobs.items() if v["name"].startswith("dlicv.t1w_sub_01"))
    details = cluster.details(dlicv)
    # the node's own request (1 thread, its memory), then the user's sbatch_args
    assert "NumCPUs=1 " in details and "TimeLimit=00:30:00" in details, details
    assert "MinMemoryNode=1G" in details, details
    assert_same_outputs(local_out, out, LABELS)
    assert tree_digest(raw) == digest


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_cancelled_task_is_completed_by_rerunning_it_alone(
    cluster, dataset, local_out, labels_file, tiny_models, tmp_path
):
    raw, digest = dataset
    out = tmp_path / "out"
    args = _array_args(raw, out, labels_file, tiny_models, "-vv")  # nipype names each node
    array_id = _sbatch(cluster, tmp_path, "--array=0-2", *TASK, *args)
    log = tmp_path / f"dlmuse-bids-{array_id}_1.log"

    def networks_started() -> bool:
        return log.is_file() and 'Executing "dlicv"' in log.read_text(errors="replace")

    _wait_for(networks_started, "task 1 to start its networks")
    cluster.run("scancel", f"{array_id}_1")
    _wait_for(lambda: not cluster.run("squeue", "--noheader", "-j", array_id), "the array's end")
    states = {index: task["state"] for index, task in _tasks(cluster, array_id).items()}
    assert states == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}, log.read_text()
    cancelled = raw / THREE[1][0]
    assert not output_paths(cancelled, out)["dseg"].exists(), "task 1 finished before scancel"

    rerun = _sbatch(cluster, tmp_path, "--wait", "--array=1", *TASK, *args)
    rerun_log = (tmp_path / f"dlmuse-bids-{rerun}_1.log").read_text()
    assert "1 processed, 0 skipped (outputs up to date), 0 failed" in rerun_log, rerun_log
    assert_same_outputs(local_out, out, LABELS)
    hidden = [p for p in out.rglob(".*") if p.name not in (".bidsignore",)]
    assert not hidden, f"left behind: {hidden}"
    assert tree_digest(raw) == digest


def test_slurmgraph_submits_the_whole_graph_and_a_rerun_checks_it(
    cluster, dataset, local_out, tiny_models, tmp_path
):
    """One image (its 15 steps are 15 jobs, each a new Python process): a shorter test.

    The launcher has gone before the jobs run, so its lock no longer covers the image: each
    sink job writes under the image's lock. The test holds that lock as another launch would
    while it plans, and nothing is written until it lets go.
    """
    raw, digest = dataset
    out = tmp_path / "out"
    before = set(cluster.jobs())
    cmd = _plugin_command(
        raw, out, tiny_models, tmp_path, "SLURMGraph", "--participant-label", LABELS[0]
    )
    submitted = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    assert "1 image(s) submitted with SLURMGraph" in submitted.stderr
    dseg = output_paths(raw / THREE[0][0], out)["dseg"]
    with ImageLocks(out, print) as another_launch:
        assert another_launch.take(dseg.name) is None

        def sinks_running() -> list[str]:  # on the 2-CPU node, not every sink at once
            return [
                job_id
                for job_id, job in cluster.jobs().items()
                if job_id not in before
                and job["name"].split("_", 1)[1].startswith("ds_")
                and job["state"] == "RUNNING"
            ]

        _wait_for(sinks_running, "a sink job", 600)
        waiting = sinks_running()
        time.sleep(3)
        assert set(waiting) <= set(sinks_running()), "a sink did not wait for the lock"
        assert not (out / f"sub-{LABELS[0]}").exists(), "a sink wrote under another's lock"
    _wait_for(lambda: not cluster.run("squeue", "--noheader"), "the submitted graph", 600)
    jobs = {k: v for k, v in cluster.jobs().items() if k not in before}
    # every step of every image is a job, chained by dependencies: all ran, none failed
    steps = (
        *SUBMITTED,
        "volumes",
        "qc",
        "seconds",
        "sidecars",
        "mosaic",
        "ds_mosaic",
        *SINK_NODES,
    )
    assert sorted(job["name"].split("_", 1)[1] for job in jobs.values()) == sorted(steps)
    assert {job["state"] for job in jobs.values()} == {"COMPLETED"}, cluster.logs()
    checked = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "0 processed, 1 skipped (outputs up to date), 0 failed" in checked.stderr
    assert not (out / ".dlmuse-locks").exists(), "a sink left its lock behind"
    assert_same_outputs(local_out, out, subjects=LABELS[:1])
    assert tree_digest(raw) == digest


@pytest.mark.parametrize(
    ("task", "per_task", "expected"),
    [
        ("0", "1", "--participant-label 01 --nprocs 3 --no-tta"),
        ("2", "1", "--participant-label 03 --nprocs 3 --no-tta"),
        ("1", "2", "--participant-label 03 --nprocs 3 --no-tta"),
        ("0", "2", "--participant-label 01 02 --nprocs 3 --no-tta"),
        ("3", "1", None),  # the array is larger than the list: nothing to do
    ],
)
def test_array_script_maps_task_ids_to_labels(tmp_path, task, per_task, expected):
    """The script alone (no cluster): which labels each task gets, in chunks too."""
    labels = tmp_path / "labels.txt"
    labels.write_text("01\n02\n03\n")
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": task,
        "SLURM_CPUS_PER_TASK": "3",
        "DLMUSE_LABELS_PER_TASK": per_task,
        "DLMUSE_BIDS": "echo dlmuse-bids",
    }
    cmd = ["bash", str(ARRAY_SCRIPT), "/in", "/out", str(labels), "--no-tta"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if expected is None:
        assert done.stdout == "" and "array larger than the list" in done.stderr
    else:
        assert done.stdout == f"dlmuse-bids /in /out participant {expected}\n"
    missing = subprocess.run(
        [*cmd[:4], str(tmp_path / "none.txt")], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 66 and "none.txt: cannot read" in missing.stderr
