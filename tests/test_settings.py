"""dlmuse_bids.settings: CPU limits and container detection."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from dlmuse_bids.settings import (
    MODES,
    NETWORKS,
    InferenceOptions,
    PipelineInference,
    available_cpus,
    container_info,
)


@pytest.fixture
def affinity():
    return len(os.sched_getaffinity(0))


def test_no_limits_means_the_affinity_mask(tmp_path, affinity):
    assert available_cpus({}, tmp_path) == affinity


def test_slurm_cpus_per_task_limits(tmp_path):
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}, tmp_path) == 1
    # nonsense values are ignored rather than trusted
    assert available_cpus({"SLURM_CPUS_PER_TASK": "zero"}, tmp_path) >= 1


@pytest.mark.parametrize(("content", "expected"), [("50000 100000", 1), ("max 100000", None)])
def test_cgroup_v2_quota(tmp_path, affinity, content, expected):
    (tmp_path / "cpu.max").write_text(content + "\n")
    assert available_cpus({}, tmp_path) == (expected or affinity)


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus({}, tmp_path) == 1


def test_container_info():
    assert container_info({}) is None
    assert container_info({"APPTAINER_CONTAINER": "/x/dlmuse.sif"}) == {
        "Type": "apptainer",
        "URI": "/x/dlmuse.sif",
    }
    assert container_info({"DLMUSE_BIDS_CONTAINER": "docker:dlmuse-bids:0.1"}) == {
        "Type": "docker",
        "Tag": "dlmuse-bids:0.1",
    }


def test_the_modes_of_the_pipeline():

    exact = PipelineInference.preset("exact", device="cpu", num_threads=2)
    assert exact.dlicv == exact.dlmuse == InferenceOptions(device="cpu", num_threads=2)
    default = PipelineInference.preset("default", device="cpu", num_threads=2)
    # DLICV in bf16 on channels-last kernels, one thread per pass (labels independent of the
    # thread count); DLMUSE as nnU-Net
    assert default.dlicv == replace(
        exact.dlicv, precision="fast", channels_last=True, threads_per_pass=1
    )
    assert default.dlmuse == exact.dlmuse
    assert default.mode == "default"
    fast = PipelineInference.preset("fast", device="cpu", num_threads=2)
    assert fast.dlicv == replace(default.dlicv, use_mirroring=False)
    # DLMUSE's big passes share the threads
    assert fast.dlmuse == replace(fast.dlicv, threads_per_pass=None)
    assert PipelineInference() == PipelineInference.preset("default")
    # overrides apply to both networks
    no_tta = PipelineInference.preset("default", use_mirroring=False, precision="fp32")
    assert [no_tta.network(n).use_mirroring for n in NETWORKS] == [False, False]
    assert [no_tta.network(n).precision for n in NETWORKS] == ["fp32", "fp32"]
    assert {PipelineInference.preset(m).mode for m in MODES} == set(MODES)
    with pytest.raises(ValueError, match="mode must be one of"):
        PipelineInference.preset("turbo")
    with pytest.raises(ValueError, match="network must be one of"):
        exact.network("DLMUSE2")
    with pytest.raises(ValueError, match="same device"):
        PipelineInference(dlicv=InferenceOptions(device="cuda"), dlmuse=InferenceOptions())
