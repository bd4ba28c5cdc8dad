"""One writer per image: the locks, across open files, processes and file systems without locks."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest

from dlmuse_bids import locks
from dlmuse_bids.locks import ImageLocks, holder, lock_path


def test_a_taken_lock_is_refused_with_its_holder_until_released(tmp_path):
    said: list[str] = []
    first, second = ImageLocks(tmp_path, said.append), ImageLocks(tmp_path, said.append)
    assert holder(tmp_path, "sub-01_dseg.nii.gz") is None  # no lock file yet
    assert first.take("sub-01_dseg.nii.gz") is None
    assert first.take("sub-01_dseg.nii.gz") is None  # held already: still ours
    other = second.take("sub-01_dseg.nii.gz")
    assert other is not None and f"pid {os.getpid()} on " in other and "since" in other
    assert holder(tmp_path, "sub-01_dseg.nii.gz") == other
    assert second.take("sub-02_dseg.nii.gz") is None  # another image is free
    first.release()
    assert lock_path(tmp_path, "sub-02_dseg.nii.gz").is_file()  # the folder keeps second's lock
    assert holder(tmp_path, "sub-01_dseg.nii.gz") is None
    with second:
        assert second.take("sub-01_dseg.nii.gz") is None
    assert second.held == {}
    assert holder(tmp_path, "sub-01_dseg.nii.gz") is None
    assert not lock_path(tmp_path, "sub-01_dseg.nii.gz").parent.exists()  # nothing left behind
    assert said == []


def test_an_output_folder_not_made_yet_is_made(tmp_path):
    out = tmp_path / "derivatives" / "dlmuse"
    assert ImageLocks(out, print).take("img") is None
    assert holder(out, "img") is not None


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (
        "import sys, time\n"
        "from dlmuse_bids.locks import ImageLocks\n"
        f"assert ImageLocks({str(tmp_path)!r}, print).take('img') is None\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(tmp_path, "img") is not None
        assert ImageLocks(tmp_path, print).take("img") is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(tmp_path, "img") is None  # its file is left, unlocked
    assert ImageLocks(tmp_path, print).take("img") is None


def test_a_lock_file_removed_while_opening_is_opened_anew(tmp_path, monkeypatch):
    """The holder removes its file as it lets go; a taker that opened the old file retries."""
    first = ImageLocks(tmp_path, print)
    assert first.take("img") is None
    real = fcntl.flock
    seen = []

    def release_meanwhile(fd, op):
        seen.append(os.fstat(fd).st_ino)
        if len(seen) == 1:
            first.release()  # unlinks the file second has open, then unlocks it
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", release_meanwhile)
    second = ImageLocks(tmp_path, print)
    assert second.take("img") is None
    assert len(seen) == 2
    third = ImageLocks(tmp_path, print)
    monkeypatch.setattr(locks.fcntl, "flock", real)
    assert third.take("img") is not None  # second's lock is on the file at the path


def test_a_probe_does_not_make_a_lock_look_taken(tmp_path, monkeypatch):
    """:func:`holder` holds a shared lock for an instant; a taker waits that instant out."""
    real = fcntl.flock
    calls = []

    def busy_once(fd, op):
        calls.append(op)
        if len(calls) == 1:
            raise BlockingIOError(errno.EAGAIN, "taken for a moment")
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", busy_once)
    monkeypatch.setattr(locks, "RETRY_SECONDS", 0.0)
    assert ImageLocks(tmp_path, print).take("img") is None
    assert len(calls) == 2


def test_a_file_system_without_locks_runs_unlocked_and_says_so_once(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    said: list[str] = []
    image_locks = ImageLocks(tmp_path, said.append)
    assert image_locks.take("a") is None
    assert image_locks.take("b") is None
    assert len(said) == 1 and "cannot lock (No locks available)" in said[0]
    assert str(tmp_path / locks.LOCKS_DIR) in said[0]


def test_a_write_waits_for_the_holder_then_holds_the_lock_itself(tmp_path):
    first = ImageLocks(tmp_path, print)
    assert first.take("img") is None
    events: list[str] = []

    def write() -> None:
        with locks.writing(tmp_path, "img", print, timeout=30, poll=0.01):
            events.append("writing")
            assert ImageLocks(tmp_path, print).take("img") is not None  # held while writing

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and events == []  # waiting for the holder
    first.release()
    thread.join(10)
    assert events == ["writing"]
    assert holder(tmp_path, "img") is None
    assert not lock_path(tmp_path, "img").parent.exists()  # let go, nothing left


def test_a_write_gives_up_naming_the_holder(tmp_path):
    held = ImageLocks(tmp_path, print)
    assert held.take("img") is None
    said = rf"img\.lock: held by pid {os.getpid()} on .* for over"
    with (
        pytest.raises(TimeoutError, match=said),
        locks.writing(tmp_path, "img", print, timeout=0.1, poll=0.02),
    ):
        raise AssertionError("wrote under another's lock")
    held.release()
