"""Download the official DLICV and DLMUSE model folders (HuggingFace) and NiChart's normative
tables (GitHub, at a pinned commit), safely.

Every file goes to ``<name>.part`` next to its final place, resumes from there with an HTTP
range request when a transfer is cut, is checked (size and sha256 where they are known, which
pins the weights whatever the repository's revision) and only then renamed into place. A lock
file serialises fetches into one directory, so parallel jobs sharing a cache neither corrupt it
nor download twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from . import __version__
from .atomic import write_bytes_atomic
from .models import (
    CHECKPOINT,
    OFFICIAL_MARKER,
    OFFICIAL_MODELS,
    TRAINER_DIR,
    ModelNotFoundError,
    find_model,
    sha256_file,
)
from .norms import NICHART_COMMIT, NICHART_FILES, NICHART_REPO
from .settings import ModelSources

logger = logging.getLogger(__name__)

HF_ENDPOINT = "https://huggingface.co"
#: The weights are pinned by their sha256 (checked on every fetch), not by this revision.
HF_REVISION = "main"
LOCK_NAME = ".dlmuse-models.lock"
#: NiChart's normative centile tables: raw files of the NiChart_Project repository at this commit.
NICHART_ENDPOINT = "https://raw.githubusercontent.com"
NORMS_LICENCE_NOTICE = (
    "NiChart's normative centile tables are CBICA's, released under the SBIA non-commercial "
    f"licence (see https://github.com/{NICHART_REPO}). By fetching them you accept its terms."
)
LICENCE_NOTICE = (
    "The DLICV and DLMUSE weights are CBICA's, released under CBICA's non-commercial licence "
    "(see https://huggingface.co/nichart/DLICV and https://huggingface.co/nichart/DLMUSE). "
    "By fetching them you accept its terms."
)
_CHUNK = 1 << 20

Progress = Callable[[str, int, int | None], None]  # (label, bytes so far, total or None)


class FetchError(RuntimeError):
    """A model file could not be fetched; ``exit_code`` follows sysexits."""

    exit_code = 69  # EX_UNAVAILABLE


class ChecksumError(FetchError):
    """A downloaded file is not the expected one (it was deleted)."""

    exit_code = 65  # EX_DATAERR


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model repository and where it goes under a models directory."""

    repo: str
    path: str  # inside the repository
    dest: str  # relative to the models directory
    size: int | None = None
    sha256: str | None = None


def official_files() -> list[RemoteFile]:
    """The files of both official model folders, laid out as :func:`models.find_model` expects."""
    files = []
    for model in OFFICIAL_MODELS.values():
        remote = f"nnunet_results/{model.dataset}/{TRAINER_DIR}"
        local = f"{model.dataset}/{TRAINER_DIR}"
        for name in ("plans.json", "dataset.json"):
            files.append(RemoteFile(model.hf_repo, f"{remote}/{name}", f"{local}/{name}"))
        ckpt = f"fold_0/{CHECKPOINT}"
        files.append(
            RemoteFile(
                model.hf_repo, f"{remote}/{ckpt}", f"{local}/{ckpt}", model.size, model.sha256
            )
        )
    return files


def file_url(endpoint: str, revision: str, item: RemoteFile) -> str:
    """HuggingFace's download URL of a repository file."""
    return f"{endpoint.rstrip('/')}/{item.repo}/resolve/{quote(revision)}/{quote(item.path)}"


def norms_files() -> list[RemoteFile]:
    """NiChart's normative tables, each pinned by size and sha256, under NiChart's names."""
    return [
        RemoteFile(NICHART_REPO, path, name, size, digest)
        for name, (path, size, digest) in NICHART_FILES.items()
    ]


def raw_url(endpoint: str, commit: str, item: RemoteFile) -> str:
    """The raw-file URL of a GitHub repository file at ``commit``."""
    return f"{endpoint.rstrip('/')}/{item.repo}/{quote(commit)}/{quote(item.path)}"


def problems(path: Path, item: RemoteFile) -> str | None:
    """Why ``path`` is not ``item`` (size, sha256, or unparsable JSON), or None."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if item.size is not None and size != item.size:
        return f"size {size} bytes, expected {item.size}"
    if item.sha256 is not None:
        digest = sha256_file(path)
        if digest != item.sha256:
            return f"sha256 {digest}, expected {item.sha256}"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"not valid JSON ({exc})"
    return None


@contextlib.contextmanager
def directory_lock(
    directory: Path, wait_message: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (a lock file in it) for the block."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_message is not None:
                wait_message()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def download(
    url: str,
    final: Path,
    item: RemoteFile,
    *,
    progress: Progress | None = None,
    retries: int = 5,
    timeout: float = 60.0,
) -> None:
    """Download ``url`` to ``final`` through ``final.part``, resuming cut transfers.

    Raises
    ------
    ChecksumError
        The complete file is not ``item`` (the partial file is deleted).
    FetchError
        The server cannot be reached, refuses, or keeps cutting the transfer.
    """
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    label = Path(item.path).name
    last_error = ""
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        if item.size is not None and have > item.size:
            part.unlink()
            have = 0
        headers = {"User-Agent": f"dlmuse-bids/{__version__}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else item.size
                with open(part, "ab" if have else "wb") as fh:
                    done = have
                    while chunk := resp.read(_CHUNK):
                        fh.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(label, done, total)
                    fh.flush()
                    os.fsync(fh.fileno())
                if total is not None and done < total:
                    raise http.client.IncompleteRead(b"", total - done)
            break
        except HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the part file is complete
                break
            if exc.code >= 500 and attempt + 1 < retries:
                last_error = f"HTTP {exc.code}"
                time.sleep(min(2**attempt, 10) * 0.1)
                continue
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            last_error = f"{type(exc).__name__}: {reason}"
            if isinstance(exc, URLError) and isinstance(
                exc.reason, ConnectionRefusedError | socket.gaierror
            ):  # no server there, or no such host: retrying will not change it
                raise FetchError(f"{url}: cannot connect ({exc.reason})") from exc
            logger.info("%s: transfer cut (%s), resuming", url, last_error)
            time.sleep(min(2**attempt, 10) * 0.1)
    else:
        raise FetchError(f"{url}: gave up after {retries} attempts ({last_error})")
    wrong = problems(part, item)
    if wrong:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: downloaded file rejected: {wrong}; it was deleted")
    os.replace(part, final)


def fetch_files(
    dest: Path,
    files: Sequence[RemoteFile],
    url_of: Callable[[RemoteFile], str],
    *,
    progress: Progress | None = None,
    wait_message: Callable[[], None] | None = None,
) -> list[Path]:
    """Make ``dest`` hold every file, downloading (from ``url_of(file)``) only what is missing
    or wrong; returns the files downloaded. Holds :func:`directory_lock` on ``dest``."""
    dest = Path(dest)
    fetched = []
    with directory_lock(dest, wait_message):
        for item in files:
            final = dest / item.dest
            if final.is_file() and problems(final, item) is None:
                continue
            download(url_of(item), final, item, progress=progress)
            fetched.append(final)
    return fetched


def fetch_models(
    dest: Path,
    *,
    endpoint: str = HF_ENDPOINT,
    revision: str = HF_REVISION,
    files: Sequence[RemoteFile] | None = None,
    progress: Progress | None = None,
    wait_message: Callable[[], None] | None = None,
) -> list[Path]:
    """:func:`fetch_files` of the model files, each checkpoint's folder then marked official."""
    files = official_files() if files is None else files
    fetched = fetch_files(
        dest,
        files,
        lambda item: file_url(endpoint, revision, item),
        progress=progress,
        wait_message=wait_message,
    )
    with directory_lock(Path(dest)):
        for item in files:
            if item.sha256 is not None:  # a checkpoint: its folder is now the official model
                _write_marker(Path(dest) / item.dest, item, revision)
    return fetched


def fetch_norms(
    dest: Path,
    endpoint: str | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """NiChart's normative tables into ``dest`` (from ``endpoint``, default GitHub's raw files,
    at :data:`NICHART_COMMIT`), telling ``say`` where and under what licence."""
    say = say or logger.warning
    say(f"fetching NiChart's normative tables into {dest}")
    say(NORMS_LICENCE_NOTICE)
    base = endpoint or NICHART_ENDPOINT
    return fetch_files(
        dest,
        norms_files(),
        lambda item: raw_url(base, NICHART_COMMIT, item),
        progress=progress,
        wait_message=lambda: say(f"waiting for another job fetching into {dest}"),
    )


def _write_marker(checkpoint: Path, item: RemoteFile, revision: str) -> None:
    """Record in the model folder that its checkpoint must stay the file fetched from ``item``."""
    folder = checkpoint.parent.parent  # <model folder>/fold_0/checkpoint_final.pth
    record = {
        "repo": item.repo,
        "revision": revision,
        "path": item.path,
        "size": item.size,
        "sha256": item.sha256,
        "fetched_by": f"dlmuse-bids {__version__}",
    }
    marker = folder / OFFICIAL_MARKER
    payload = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    if not marker.is_file() or marker.read_bytes() != payload:
        write_bytes_atomic(marker, payload)


def verify_models(dest: Path, files: Sequence[RemoteFile] | None = None) -> list[str]:
    """What is wrong with an installed models directory (empty when all is well)."""
    found = []
    for item in official_files() if files is None else files:
        wrong = problems(Path(dest) / item.dest, item)
        if wrong:
            found.append(f"{Path(dest) / item.dest}: {wrong}")
    return found


def fetch_official(
    dest: Path,
    endpoint: str | None = None,
    revision: str = HF_REVISION,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """:func:`fetch_models` of both official models, telling ``say`` where and under what licence.

    ``endpoint`` defaults to HuggingFace; ``say`` (default: a log warning) also hears when
    another job's fetch into ``dest`` is being waited for. Returns the files downloaded.
    """
    say = say or logger.warning
    say(f"fetching the DLICV and DLMUSE models into {dest}")
    say(LICENCE_NOTICE)
    return fetch_models(
        dest,
        endpoint=endpoint or HF_ENDPOINT,
        revision=revision,
        progress=progress,
        wait_message=lambda: say(f"waiting for another job fetching into {dest}"),
    )


def ensure_models(
    sources: ModelSources,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Path, ...]:
    """The search directories, once both models are in one of them.

    A missing model is fetched into ``sources.fetch_dir`` first when there is one and nothing
    forbids it (``sources.offline``); ``say`` gets the user-facing lines (the licence, waiting
    for another job's fetch).

    Raises
    ------
    ModelNotFoundError
        A model is missing and could not (or may not) be fetched; the message says why.
    """
    try:
        for key in OFFICIAL_MODELS:
            find_model(key, sources.search_dirs)
        return sources.search_dirs
    except ModelNotFoundError as exc:
        missing = exc
    if sources.fetch_dir is None:
        raise missing
    if sources.offline:
        raise ModelNotFoundError(
            f"{missing} Not downloading them: {sources.offline}.{sources.hint}"
        )
    try:
        fetch_official(sources.fetch_dir, sources.endpoint, progress=progress, say=say)
    except (FetchError, OSError) as exc:
        raise ModelNotFoundError(f"{missing} Fetching them failed: {exc}") from exc
    return sources.search_dirs
