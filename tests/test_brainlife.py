"""The brainlife.io App: ``main`` + ``config.json`` in a task folder, brainlife's datatypes out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids import __version__
from dlmuse_bids.cli.brainlife import ConfigError, main, read_config
from dlmuse_bids.labels import ICV_ID, dseg_table
from tests.conftest import needs_shared
from tests.support.bids import tree_digest, write_scan
from tests.support.containers import IMAGE_MODELS, users_folder, world_readable

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main"


def _config(task: Path, **config) -> Path:
    task.mkdir(parents=True, exist_ok=True)
    path = task / "config.json"
    path.write_text(json.dumps(config))
    return path


# ---- config.json ----


def test_config_gives_the_t1_options_and_labels(tmp_path):
    path = _config(
        tmp_path / "task",
        t1="../input/t1.nii.gz",
        tta=False,
        nprocs="2",
        _inputs=[{"id": "t1", "meta": {"subject": "ADNI_011-S-0002", "session": "m06"}}],
    )
    settings = read_config(path)
    assert settings["t1"] == (tmp_path / "task" / "../input/t1.nii.gz").absolute()
    assert settings["tta"] is False and settings["fast"] is False
    assert settings["nprocs"] == 2 and settings["device"] == "auto"
    assert settings["subject"] == "ADNI011S0002" and settings["session"] == "m06"


def test_config_without_metadata_names_a_default_subject(tmp_path):
    settings = read_config(_config(tmp_path, t1="/x/t1.nii.gz"))
    assert settings["subject"] == "brainlife" and settings["session"] is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "no input T1w"),
        ({"t1": 3}, "no input T1w"),
        ({"t1": "t1.nii.gz", "tta": "maybe"}, "'tta' must be a bool"),
        ({"t1": "t1.nii.gz", "nprocs": True}, "'nprocs' must be a int"),
        ({"t1": "t1.nii.gz", "device": "tpu"}, "'device' must be one of"),
    ],
)
def test_bad_config_is_refused(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        read_config(_config(tmp_path, **config))


def test_bad_config_exits_64_with_a_product_message(tmp_path, monkeypatch):
    task = tmp_path / "task"
    _config(task, t1="t1.nii.gz", device="tpu")
    monkeypatch.chdir(task)
    assert main([], env={}) == 64
    product = json.loads((task / "product.json").read_text())
    assert product["brainlife"][0]["type"] == "error"
    assert "'device'" in product["brainlife"][0]["msg"]


def test_missing_t1_exits_66(tmp_path, monkeypatch):
    task = tmp_path / "task"
    _config(task, t1="../nowhere/t1.nii.gz")
    monkeypatch.chdir(task)
    assert main([], env={}) == 66
    assert "input T1w not found" in (task / "product.json").read_text()


def test_main_runs_the_image_of_this_version():
    text = MAIN.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert os.access(MAIN, os.X_OK), "main must be executable"
    assert f"image=docker://dlmuse/dlmuse-bids:{__version__}\n" in text
    assert re.search(r"^#PBS -l nodes=1:ppn=\d+,vmem=\d+gb,walltime=", text, re.M)
    assert "dlmuse-brainlife config.json" in text


# ---- the whole App ----


def check_task_outputs(task: Path, subject: str) -> None:
    """brainlife's datatypes as its validators expect them, consistent with each other."""
    parc = nib.load(task / "parc" / "parc.nii.gz")
    values = set(np.unique(np.asanyarray(parc.dataobj)).tolist()) - {0}
    labels = json.loads((task / "parc" / "label.json").read_text())
    assert {"name", "label", "voxel_value", "r", "g", "b"} <= set(labels[0])
    by_value = {entry["voxel_value"]: entry for entry in labels}
    assert values <= set(by_value), "a voxel value of parc.nii.gz has no label.json entry"
    assert len(by_value) == len(dseg_table()) - 1  # every MUSE label but the background
    key = (task / "parc" / "key.txt").read_text().splitlines()
    assert len(key) == len(labels) and key[0].startswith(f"{labels[0]['label']} -> ")
    mask = nib.load(task / "mask" / "mask.nii.gz")
    assert np.array_equal(mask.affine, parc.affine)
    inside = np.asanyarray(mask.dataobj) > 0
    assert inside.any()
    stats = pd.read_csv(task / "parc-stats" / "dlmuse_volumes.csv", dtype={"subjectID": str})
    assert list(stats.columns[:4]) == ["subjectID", "index", "name", "full_name"]
    assert set(stats["subjectID"]) == {subject}
    icv = stats.set_index("index").loc[ICV_ID, "volume_mm3"]
    assert icv > 0
    product = json.loads((task / "product.json").read_text())
    assert product["brainlife"][0]["type"] == "success"
    assert product["dlmuse"]["ml"]["ICV"] == round(icv / 1000, 1)
    assert len(json.dumps(product)) < 4096, "product.json should stay a few kB"
    assert (task / "dlmuse" / "dataset_description.json").is_file()
    assert not (task / ".dlmuse-work").exists()


@pytest.fixture(scope="module")
def brainlife_input(tmp_path_factory) -> Path:
    """A brainlife-style staging area: the T1w of an earlier task, beside the App's task."""
    root = tmp_path_factory.mktemp("brainlife")
    write_scan(root / "5f1a" / "t1w", "t1.nii.gz", "sub-brainchop_T1w.nii.gz")
    return root


BRAINLIFE_CONFIG = {
    "t1": "../5f1a/t1w/t1.nii.gz",
    "tta": False,
    "device": "cpu",
    "nprocs": 2,
    "_inputs": [{"id": "t1", "datatype": "neuro/anat/t1w", "meta": {"subject": "0042"}}],
}


@needs_shared
def test_the_app_on_this_machine(brainlife_input, tiny_models, monkeypatch):
    task = brainlife_input / "host-task"
    _config(task, **BRAINLIFE_CONFIG)
    monkeypatch.chdir(task)
    assert main([], env={"DLMUSE_MODEL_DIR": str(tiny_models), "DLMUSE_OFFLINE": "1"}) == 0
    check_task_outputs(task, "0042")
    assert (task / "dlmuse" / "sub-0042" / "anat" / "sub-0042_seg-DLMUSE_dseg.nii.gz").is_file()


@needs_shared
def test_a_failing_image_says_why_in_product_json(tmp_path, tiny_models, monkeypatch):
    task = tmp_path / "task"
    blank = tmp_path / "in" / "t1.nii.gz"
    blank.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4)), blank)
    _config(task, t1="../in/t1.nii.gz", tta=False, device="cpu")
    monkeypatch.chdir(task)
    assert main([], env={"DLMUSE_MODEL_DIR": str(tiny_models)}) == 1
    message = json.loads((task / "product.json").read_text())["brainlife"][0]
    assert message["type"] == "error"
    assert "zero" in message["msg"].lower(), message
    assert not (task / "parc").exists()


@needs_shared
def test_main_runs_the_image_as_brainlife_calls_it(
    container_engine, app_image, brainlife_input, tiny_models, tmp_path
):
    """``main`` in a fresh task folder, its container command pointed at the local image."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    world_readable(brainlife_input)
    world_readable(models)
    task = users_folder(brainlife_input / "image-task", 4321, 4321)
    _config(task, **BRAINLIFE_CONFIG)
    shutil.copy(MAIN, task / "main")  # brainlife copies the App's repository into the task
    before = tree_digest(brainlife_input / "5f1a")
    run = (
        f"{container_engine.exe} run --rm --read-only --network none --tmpfs /tmp "
        f"--user 4321:4321 -v {brainlife_input}:{brainlife_input} "
        f"-v {models}:{IMAGE_MODELS}:ro -w {task} --entrypoint /usr/bin/env {app_image[0].name}"
    )
    env = {**container_engine.env, "DLMUSE_CONTAINER_EXEC": run}
    done = subprocess.run(
        ["./main"], cwd=task, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check_task_outputs(task, "0042")
    owners = {p.stat().st_uid for p in task.rglob("*") if p.name not in ("main", "config.json")}
    assert owners == {4321}, "outputs must belong to the uid brainlife runs the task as"
    assert tree_digest(brainlife_input / "5f1a") == before
