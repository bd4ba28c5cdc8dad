"""One writer per image: a lock per image's outputs, held by the run that segments it.

Two array tasks given the same label, or a user's second launch, must not write one image's
outputs at once. A run takes each image's lock before it touches the image's outputs and holds
it until they are all written; a run that finds it taken leaves the image to the other. The
locks are ``flock`` locks on files in ``<output_dir>/.dlmuse-locks/`` (hidden, so no BIDS tool
sees them): the kernel (or the NFS/Lustre lock manager, across hosts) drops them when their
process ends, however it ends, so a killed run leaves no stale lock (at most an unlocked file,
which the next run takes). A run removes its lock files as it lets go
(:meth:`ImageLocks.release`). The jobs of a graph plugin outlive their launcher's locks: each
takes the lock for its own write (:func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

#: The folder of the lock files, in the output directory.
LOCKS_DIR = ".dlmuse-locks"
#: errno values of a file system that has no locks (some NFS mounts, FUSE): run unlocked.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
#: A lock found taken is tried again this often, this far apart: :func:`holder` holds one
#: for microseconds; a run holds it for the image's minutes.
RETRIES, RETRY_SECONDS = 5, 0.05
#: How long a write under :func:`writing` waits for the image's lock, polling this often: long
#: enough for another run to finish the image (it then writes the same files), short enough
#: that a job does not sit out its time limit.
WRITE_WAIT_SECONDS, WRITE_POLL_SECONDS = 3600.0, 1.0


def lock_path(output_dir: Path, name: str) -> Path:
    """The lock file of the image whose outputs are named ``name``."""
    return Path(output_dir) / LOCKS_DIR / f"{name}.lock"


class ImageLocks:
    """The images' locks this run holds; released by :meth:`release` or when the process ends.

    ``say`` hears, once, that the file system cannot lock (the run then goes on unlocked).
    """

    def __init__(self, output_dir: Path, say: Callable[[str], None]) -> None:
        self.output_dir = Path(output_dir)
        self.say = say
        self.held: dict[str, int] = {}
        self.unlocked = False  # the file system has no locks: every take succeeds

    def take(self, name: str) -> str | None:
        """Lock ``name``'s outputs for this run: None when taken, else who holds them."""
        if self.unlocked or name in self.held:
            return None
        path = lock_path(self.output_dir, name)
        for _ in range(RETRIES):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the folder went with another run's last lock: again
                continue
            except OSError as exc:
                return self._without_locks(exc)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(RETRY_SECONDS)
                continue
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCKS:
                    return self._without_locks(exc)
                raise
            if not _is_file_at(fd, path):  # its holder removed it as we opened it: again
                os.close(fd)
                continue
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
            self.held[name] = fd
            return None
        return holder(self.output_dir, name) or "another run"

    def _without_locks(self, exc: OSError) -> None:
        self.unlocked = True
        self.say(
            f"{self.output_dir / LOCKS_DIR}: cannot lock ({exc.strerror or exc}); a second run "
            "on the same images at the same time will not be detected"
        )

    def release(self, name: str | None = None) -> None:
        """Let go of ``name``'s lock, or of every lock held; their files (and folder) go.

        A file is removed while its lock is held, so whoever opened it meanwhile sees, once
        it has the lock, that the file is no longer there (:func:`_is_file_at`) and opens anew.
        """
        for key in [name] if name is not None else list(self.held):
            fd = self.held.pop(key, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    lock_path(self.output_dir, key).unlink()
                os.close(fd)  # closing releases the lock
        with contextlib.suppress(OSError):  # not empty: another run's locks are in it
            (self.output_dir / LOCKS_DIR).rmdir()

    def __enter__(self) -> ImageLocks:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def writing(
    output_dir: Path,
    name: str,
    say: Callable[[str], None],
    timeout: float = WRITE_WAIT_SECONDS,
    poll: float = WRITE_POLL_SECONDS,
):
    """Hold ``name``'s lock for one write, waiting while another process holds it.

    For the jobs of a graph plugin (``SLURMGraph``...): the launcher holds the locks only while
    it plans and submits, so each job that writes an image's outputs takes the lock for its
    write. A second launch then never removes a job's temporaries as they are written, and two
    submissions of one image write in turn, never at once.

    Raises
    ------
    TimeoutError
        The lock was held by another process for ``timeout`` seconds.
    """
    locks = ImageLocks(output_dir, say)
    deadline = time.monotonic() + timeout
    while (other := locks.take(name)) is not None:
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{lock_path(output_dir, name)}: held by {other} for over {timeout:.0f} s"
            )
        time.sleep(poll)
    try:
        yield
    finally:
        locks.release(name)


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        st = path.stat()
    except OSError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def holder(output_dir: Path, name: str) -> str | None:
    """Who holds ``name``'s lock now (what its lock file says), or None if no run does."""
    path = lock_path(output_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            return text or "another run"
        except OSError:  # no locks here: nobody can be said to hold it
            return None
        return None
    finally:
        os.close(fd)
