"""The container image, built from this checkout and run as users and platforms run it.

One image per test session (``app_image``: CPU torch, no weights, the test template baked in),
built by ``tools/build-image`` against a private dockerd. Narrow random-weight models are mounted
read-only where the image looks for its weights. Every run's outputs are compared with those of
the same version run on this machine, on the same data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dlmuse_bids import __version__
from tests.conftest import needs_shared
from tests.support.bids import STANDARD_T1W, make_dataset, tree_digest
from tests.support.containers import IMAGE_MODELS, users_folder, world_readable
from tests.support.outputs import assert_same_outputs
from tests.support.paths import NICHART_NORMS
from tests.test_containers import read_definition

pytestmark = needs_shared

ROOT = Path(__file__).resolve().parents[1]
#: two subjects, one with two sessions
IMAGES = [STANDARD_T1W[0], STANDARD_T1W[2], STANDARD_T1W[3]]
FAST = ["--no-tta", "--device", "cpu", "--nprocs", "2"]
#: the PATH Singularity/Apptainer starts a --cleanenv container with, before %environment
SINGULARITY_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: a user and group that have no entry in the image's /etc/passwd and /etc/group
UID, GID = 4321, 8765


@pytest.fixture(scope="module")
def image(app_image) -> str:
    return app_image[0].name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    raw = world_readable(make_dataset(tmp_path_factory.mktemp("bids") / "ds", IMAGES))
    return raw, tree_digest(raw)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("models") / "models"
    shutil.copytree(tiny_models, copy)
    return world_readable(copy)


def docker_run(
    engine, image, *args, mounts=(), user=(UID, GID), options=(), remove=True, timeout=900
):
    """``docker run`` as the README tells users to: read-only root, no network, any uid."""
    cmd = ["run", *(["--rm"] if remove else []), "--read-only", "--network", "none"]
    cmd += ["--tmpfs", "/tmp"]
    if user is not None:
        cmd += ["--user", f"{user[0]}:{user[1]}"]
    for src, dst, mode in mounts:
        cmd += ["-v", f"{src}:{dst}:{mode}"]
    return engine(*cmd, *options, image, *args, check=False, timeout=timeout)


#: The image has NiChart's tables built in when the tests built it with them: so has the host.
NORMS = ["--norms-dir", str(NICHART_NORMS)] if NICHART_NORMS.is_dir() else []


def _app(*args) -> list[str]:
    exe = Path(sys.executable).with_name("dlmuse-bids")
    return [str(exe), *map(str, args)]


@pytest.fixture(scope="module")
def host_run(dataset, models, app_image, tmp_path_factory):
    """Both levels on this machine, with the image's template; output folder and seconds."""
    raw, _ = dataset
    out = tmp_path_factory.mktemp("host") / "out"
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(app_image[1])}
    start = time.monotonic()
    for level in ("participant", "group"):
        done = subprocess.run(
            _app(raw, out, level, "--model-dir", models, *FAST, *NORMS),
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr
    return out, time.monotonic() - start


@pytest.fixture(scope="module")
def docker_out(container_engine, image, dataset, models, tmp_path_factory):
    """Both levels in the image: ``docker run --read-only --network none --user U:G``; the
    output folder, the seconds, the logs, and what ``docker diff`` saw of the participant run
    (kept, not ``--rm``, to ask)."""
    raw, _ = dataset
    out = users_folder(tmp_path_factory.mktemp("docker") / "out", UID, GID)
    mounts = [(raw, "/data", "ro"), (out, "/out", "rw"), (models, IMAGE_MODELS, "ro")]
    name = f"dlmuse-participant-{os.getpid()}"
    start, logs = time.monotonic(), []
    try:
        for level, keep in (("participant", ["--name", name]), ("group", ["--rm"])):
            done = docker_run(
                container_engine, image, "/data", "/out", level, *FAST, mounts=mounts,
                options=keep, remove=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            logs.append(done.stdout + done.stderr)
        changed = container_engine("diff", name).stdout.splitlines()
    finally:
        container_engine("rm", "-f", name, check=False)
    diff = [line.split(None, 1)[1] for line in changed if line.strip()]
    return out, time.monotonic() - start, "\n".join(logs), diff


# ---- 1. the BIDS App, as `docker run` ----


def test_docker_run_gives_the_host_outputs(docker_out, host_run, dataset):
    out, seconds, log, _ = docker_out
    host, host_seconds = host_run
    assert "3 processed" in log, log
    assert_same_outputs(host, out)
    if NORMS:  # the image's built-in tables give the host's centiles
        assert len(list(out.rglob("*_seg-DLMUSE_centiles.tsv"))) == 3
    raw, before = dataset
    assert tree_digest(raw) == before, "the container changed the input dataset"
    print(f"\nimage run {seconds:.0f} s, host run {host_seconds:.0f} s (3 T1w, both levels)")


def test_docker_run_group_tables_equal_the_hosts(docker_out, host_run):
    out, host = docker_out[0] / "group", host_run[0] / "group"
    tables = sorted(p.name for p in host.glob("*.*sv")) + ["DLMUSE_Volumes.csv"]
    assert "dlmuse_volumes.tsv" in tables
    for name in tables:
        assert (out / name).read_bytes() == (host / name).read_bytes(), name
    volumes = pd.read_csv(out / "dlmuse_volumes.tsv", sep="\t")
    assert len(volumes) == 3 and set(volumes["status"]) == {"ok"}


def test_docker_run_outputs_belong_to_the_calling_user(docker_out):
    out = docker_out[0]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [out, *out.rglob("*")]}
    assert owners == {(UID, GID)}


def test_docker_run_records_the_container(docker_out):
    description = json.loads((docker_out[0] / "dataset_description.json").read_text())
    container = description["GeneratedBy"][0]["Container"]
    assert container == {"Type": "docker", "Tag": f"dlmuse/dlmuse-bids:{__version__}"}
    assert description["SourceDatasets"][0]["URL"] == "file:///data"


# ---- 2. Singularity/Apptainer's conditions ----


def _singularity_script(section: str) -> str:
    """What Singularity runs for ``section``: %environment sourced, then the section."""
    _, sections = read_definition((ROOT / "Singularity.def").read_text())
    return f"{sections['environment']}\n{sections[section]}\n"


def singularity_style(engine, image, section, tmp: Path, *args, mounts=(), user=(7777, 7777)):
    """Run a Singularity.def section in the image as ``singularity run --containall
    --cleanenv`` would: an empty environment but the image's %environment, a uid unknown to
    the image, no HOME (and none writable), read-only root, only the data folders bound."""
    scripts = tmp / f"singularity-{section}"
    scripts.mkdir()
    (scripts / "run.sh").write_text(_singularity_script(section))
    world_readable(scripts)
    return docker_run(
        engine,
        image,
        "-i",
        SINGULARITY_PATH,
        "/bin/sh",
        "/.singularity/run.sh",
        *args,
        mounts=[*mounts, (scripts, "/.singularity", "ro")],
        user=user,
        options=["--entrypoint", "/usr/bin/env", "--workdir", "/"],
    )


def test_singularity_runscript_gives_the_host_outputs(
    container_engine, image, dataset, models, host_run, tmp_path
):
    raw, before = dataset
    out = users_folder(tmp_path / "out", 7777, 7777)
    mounts = [(raw, "/data", "ro"), (out, "/out", "rw"), (models, IMAGE_MODELS, "ro")]
    done = singularity_style(
        container_engine, image, "runscript", tmp_path, "/data", "/out", "participant", *FAST,
        "--participant-label", "02", mounts=mounts,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 processed" in done.stdout + done.stderr
    assert_same_outputs(host_run[0], out, subjects=["02"])
    assert tree_digest(raw) == before


def test_singularity_test_section_passes_in_the_image(container_engine, image, tmp_path):
    done = singularity_style(container_engine, image, "test", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"dlmuse-bids {__version__}" in done.stdout
    assert "no model weights in the image" in done.stdout


def test_singularity_test_section_verifies_weights_when_there_are_some(
    container_engine, image, models, tmp_path
):
    """Random weights are not the official ones: %test must say so and fail (exit 65)."""
    mounts = [(models, IMAGE_MODELS, "ro")]
    done = singularity_style(container_engine, image, "test", tmp_path, mounts=mounts)
    assert done.returncode == 65, done.stdout + done.stderr
    assert f"{IMAGE_MODELS}/Dataset901_Task901_dlicv/" in done.stderr
    assert "expected 246584635" in done.stderr, done.stderr  # the official checkpoint's size


# ---- 3. exit codes and messages through the container ----


def test_version(container_engine, image):
    done = docker_run(container_engine, image, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"dlmuse-bids {__version__}"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["/data", "/out", "participant", "--nprocs", "0"], 64, "--nprocs"),
        (["/data", "/out", "everything"], 17, "unknown analysis level"),
        (["/data", "/out", "participant", "--participant-label", "99"], 18, "99"),
        (["/nowhere", "/out", "participant"], 66, "/nowhere"),
    ],
)
def test_exit_codes(container_engine, image, dataset, models, tmp_path, args, code, message):
    out = users_folder(tmp_path / "out", UID, GID)
    mounts = [(dataset[0], "/data", "ro"), (out, "/out", "rw"), (models, IMAGE_MODELS, "ro")]
    done = docker_run(container_engine, image, *args, mounts=mounts)
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr


def test_missing_weights_say_what_to_mount(container_engine, image, dataset, tmp_path):
    out = users_folder(tmp_path / "out", UID, GID)
    mounts = [(dataset[0], "/data", "ro"), (out, "/out", "rw")]
    done = docker_run(
        container_engine, image, "/data", "/out", "participant", *FAST, mounts=mounts
    )
    assert done.returncode == 66, done.stdout + done.stderr
    assert f"-v /path/to/models:{IMAGE_MODELS}:ro" in done.stderr
    assert f"-B /path/to/models:{IMAGE_MODELS}" in done.stderr
    assert not list(out.rglob("*_dseg.nii.gz"))


# ---- 6. what the image is ----


def test_image_facts(container_engine, app_image):
    built, _ = app_image
    facts = json.loads(container_engine("image", "inspect", built.name).stdout)[0]
    config = facts["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["dlmuse-bids"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "non-commercial" in labels["org.opencontainers.image.description"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    size_gib = facts["Size"] / 2**30
    assert size_gib < 2.5, f"CPU image is {size_gib:.2f} GiB"
    print(f"\nimage {built.name}: {size_gib:.2f} GiB, built in {built.seconds:.0f} s")


def test_image_holds_no_training_stack(container_engine, image):
    probe = (
        "import importlib.util as u, sys, torch; "
        "print([m for m in ('torchvision', 'timm', 'nnunetv2') if u.find_spec(m)], "
        "torch.version.cuda, sys.version_info >= (3, 11))"
    )
    done = docker_run(container_engine, image, "-c", probe, options=["--entrypoint", "python"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "None", "True"]


def test_the_root_filesystem_is_read_only(container_engine, image):
    done = docker_run(
        container_engine, image, "-c", "touch /opt/venv/x", options=["--entrypoint", "/bin/sh"]
    )
    assert done.returncode != 0
    assert "Read-only file system" in done.stderr


def test_a_run_writes_nothing_in_the_image(docker_out):
    """The participant run's container layer holds no change but the mount points docker made:
    everything went to the /tmp tmpfs and the mounted output."""
    assert set(docker_out[3]) <= {"/data", "/out", "/tmp"}, docker_out[3]


# ---- 4. Boutiques, as CBRAIN and VIP launch descriptors ----


def test_bosh_exec_launch_runs_the_image(
    container_engine, image, dataset, models, tmp_path, monkeypatch
):
    """``bosh exec launch boutiques.json invocation.json`` through the docker command line."""
    boutiques = pytest.importorskip("boutiques", reason="boutiques not installed")
    descriptor = json.loads((ROOT / "boutiques.json").read_text())
    # the descriptor names the released image: give the one built here that name, in this engine
    container_engine("tag", image, descriptor["container-image"]["image"])
    launch = tmp_path / "launch"
    shutil.copytree(dataset[0], launch / "ds", symlinks=True)
    invocation = {
        "bids_dir": "ds",
        "output_dir": "out",
        "analysis_level": "participant",
        "participant_label": ["02"],
        "skip_bids_validation": True,
        "model_dir": str(models),
        "no_tta": True,
        "device": "cpu",
        "nprocs": 2,
    }
    (launch / "invocation.json").write_text(json.dumps(invocation))
    monkeypatch.chdir(launch)
    monkeypatch.setenv("DOCKER_HOST", container_engine.env["DOCKER_HOST"])
    monkeypatch.setenv("HOME", str(tmp_path))  # bosh keeps a cache in ~/.cache/boutiques
    monkeypatch.setenv("PATH", f"{Path(container_engine.exe).parent}:{os.environ['PATH']}")
    result = boutiques.bosh(
        ["exec", "launch", "--user", "--no-pull", "--skip-data-collection",
         str(ROOT / "boutiques.json"), "invocation.json"]
    )  # fmt: skip
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    assert result.missing_files == [], [str(f) for f in result.missing_files]
    found = {f.boutiques_name: f.file_name for f in result.output_files}
    assert found["participant_dseg"].endswith("sub-02/anat/sub-02_seg-DLMUSE_dseg.nii.gz")
    assert Path(found["dataset_description"]).is_file()
