"""A private container engine and the app's image, built from this checkout, for the tests.

Everything specific to this machine lives here, found at run time: the engine is Debian's
``dockerd`` started on a private socket under a temporary folder (as root, with no bridge
network); the base image ``debian:bookworm-slim`` is made with ``debootstrap`` when no registry
can provide it; pip inside the build gets the CA bundle that this machine's pip uses, as a build
secret. The image itself is built with ``tools/build-image`` like anyone would build it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.paths import NICHART_NORMS

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGE = REPO / "tools" / "build-image"
BASE_IMAGE = "debian:bookworm-slim"
#: where the image looks for its weights (the Dockerfile's DLMUSE_MODEL_DIR)
IMAGE_MODELS = "/opt/dlmuse/models"
#: the Debian release that image is made of
BASE_SUITE = "bookworm"


def world_readable(root: Path) -> Path:
    """Let any uid in a container read ``root`` (pytest's temporary folders are 0700)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return root


def users_folder(path: Path, uid: int, gid: int) -> Path:
    """An empty folder owned by ``uid:gid``, as a user's own output folder would be."""
    path.mkdir(parents=True)
    os.chown(path, uid, gid)
    return path


class EngineUnavailableError(RuntimeError):
    """No container engine can be used here (the reason says what is missing)."""


@dataclass
class Engine:
    """A docker client talking to the private daemon."""

    exe: str
    env: dict[str, str]
    root: Path
    pidfile: Path | None = None
    #: options every ``build`` needs on this machine (RUN steps use the host's network)
    build_args: list[str] = field(default_factory=lambda: ["--network", "host"])

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600, **kwargs
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.exe, *map(str, args)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{self.exe} {' '.join(map(str, args))}: exit {proc.returncode}\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def has_image(self, name: str) -> bool:
        return self("image", "inspect", name, check=False).returncode == 0

    def stop(self) -> None:
        """Stop the daemon started by :func:`start_dockerd` and remove its storage."""
        if self.pidfile is None or not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)


def start_dockerd(root: Path) -> Engine:
    """Start Debian's dockerd with its storage, state and socket under ``root``."""
    dockerd, client = shutil.which("dockerd"), shutil.which("docker")
    if dockerd is None or client is None:
        raise EngineUnavailableError(
            "dockerd/docker not found (Debian: apt-get install docker.io debootstrap)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailableError("dockerd needs root here (rootless docker is not set up)")
    root.mkdir(parents=True, exist_ok=True)
    sock, pidfile = root / "docker.sock", root / "docker.pid"
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - the daemon keeps writing to it
    subprocess.Popen(
        [
            dockerd,
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "--host", f"unix://{sock}",
            "--pidfile", str(pidfile),
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
        ],
        cwd=REPO,  # not the cwd of whatever test runs meanwhile: it may be deleted
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DOCKER_HOST": f"unix://{sock}",
        "DOCKER_CONFIG": str(root / "client"),
        "HOME": str(root),
    }
    engine = Engine(client, env, root, pidfile)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sock.exists() and engine("version", check=False, timeout=10).returncode == 0:
            return engine
        time.sleep(0.5)
    engine.stop()
    raise RuntimeError(f"dockerd did not start: {(root / 'dockerd.log').read_text()[-3000:]}")


def ensure_base_image(engine: Engine, work: Path, name: str = BASE_IMAGE) -> None:
    """Make ``debian:bookworm-slim`` locally (debootstrap + import) when it is not there."""
    if engine.has_image(name):
        return
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise EngineUnavailableError(f"{name} is not present and debootstrap is not installed")
    rootfs = work / "rootfs"
    proc = subprocess.run(
        [debootstrap, "--variant=minbase", BASE_SUITE, str(rootfs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / cache).glob("*"):
            if item.is_file():
                item.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], cwd=REPO, stdout=subprocess.PIPE)
    engine("import", "-", name, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs)


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts (its ``cert`` setting or the usual variables)."""
    candidates = [os.environ.get(v) for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    pip = subprocess.run(
        ["python3", "-m", "pip", "config", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in pip.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".cert"):
            candidates.append(value.strip().strip("'\""))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class BuiltImage:
    name: str
    seconds: float
    log: str


def build_image(engine: Engine, tag: str, template_dir: Path | None, log: Path) -> BuiltImage:
    """``tools/build-image --cpu --no-models`` against the private engine; raises on failure."""
    cmd = [str(BUILD_IMAGE), "--cpu", "--no-models", "--tag", tag, "--engine", "docker"]
    cmd += ["--template-dir", str(template_dir)] if template_dir else ["--no-template"]
    cmd += ["--norms-dir", str(NICHART_NORMS)] if NICHART_NORMS.is_dir() else ["--no-norms"]
    ca = host_ca_bundle()
    if ca is not None:
        cmd += ["--ca-bundle", str(ca)]
    cmd += ["--", *engine.build_args]
    env = {**os.environ, **engine.env}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800
        )
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"tools/build-image failed (exit {proc.returncode}):\n{text[-4000:]}")
    return BuiltImage(tag, time.monotonic() - start, text)


class ImageBuilder:
    """The engine and the image, prepared on a thread while the other tests run.

    Building is mostly waiting on the package registries, so the container tests are put
    last and the build overlaps with the rest of the suite. :meth:`wait` gives the engine, the
    built image and the TemplateFlow home baked into it, or raises what went wrong.
    """

    def __init__(self, root: Path, tag: str = "dlmuse-bids:test") -> None:
        self.root, self.tag = root, tag
        self.engine: Engine | None = None
        self._result: tuple[BuiltImage, Path] | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._prepare, name="image-builder", daemon=True).start()

    def _prepare(self) -> None:
        from tests.support.templates import make_templateflow_home

        try:
            self.engine = start_dockerd(self.root / "engine")
            ensure_base_image(self.engine, self.root)
            templates = make_templateflow_home(self.root / "templateflow")
            built = build_image(self.engine, self.tag, templates, self.root / "build.log")
            self._result = (built, templates)
        except BaseException as exc:  # handed to the tests that wait for it
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> tuple[Engine, BuiltImage, Path]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self.engine is not None and self._result is not None
        return self.engine, *self._result

    def stop(self) -> None:
        """Stop the engine (after waiting for a build in progress) and remove everything."""
        self._done.wait()
        if self.engine is not None:
            self.engine.stop()
        shutil.rmtree(self.root, ignore_errors=True)
