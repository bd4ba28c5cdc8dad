"""``dlmuse-bids`` run the way containers and BABS run it: writes only where it may."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import needs_shared
from tests.support.bids import STANDARD_T1W, make_dataset
from tests.support.paths import NICHART_NORMS

pytestmark = needs_shared

APP = Path(sys.executable).parent / "dlmuse-bids"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``root`` (files and folders) with its mtime and size."""
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.skipif(not APP.exists(), reason=f"{APP} not installed (pip install -e .)")
def test_writes_nothing_outside_output_work_and_tmp(tiny_models, tmp_path):
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3]])
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (home, cwd, tmp):
        folder.mkdir()
    watched = {"home": home, "cwd": cwd, "raw": raw, "models": tiny_models}
    before = {name: _tree(path) for name, path in watched.items()}
    raw_mode = raw.stat().st_mode
    for path in (raw, home):  # read-only for anyone but root; the snapshots check root too
        path.chmod(0o555)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
    }
    try:
        proc = subprocess.run(
            [
                str(APP),
                str(raw),
                str(tmp_path / "out"),
                "participant",
                "--model-dir",
                str(tiny_models),
                "-w",
                str(tmp_path / "work"),
                "--no-tta",
                "--device",
                "cpu",
                "--nprocs",
                "1",
                "--skip-bids-validation",
                *(["--norms-dir", str(NICHART_NORMS)] if NICHART_NORMS.is_dir() else []),
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        raw.chmod(raw_mode)
        home.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {name: _tree(path) for name, path in watched.items()}
    for name in watched:
        assert after[name] == before[name], (
            f"{name} was written: {set(after[name]) ^ set(before[name])}"
        )
    assert list((tmp_path / "out").rglob("*_dseg.nii.gz"))
    assert list((tmp_path / "out").rglob("*_centiles.tsv")) or not NICHART_NORMS.is_dir()


@pytest.mark.skipif(not APP.exists(), reason=f"{APP} not installed (pip install -e .)")
def test_babs_style_run_gives_a_zip_friendly_tree(tiny_models, tmp_path):
    """BABS runs one participant per job with ``--participant-label sub-XX`` and zips the
    output folder: it must hold that participant's files and the dataset files only, all
    regular files with relative names, and no temporary debris."""
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3], STANDARD_T1W[4]])
    out = tmp_path / "outputs" / "dlmuse"
    proc = subprocess.run(
        [
            str(APP),
            str(raw),
            str(out),
            "participant",
            "--participant-label",
            "sub-03",
            "--model-dir",
            str(tiny_models),
            "--no-tta",
            "--device",
            "cpu",
            "--nprocs",
            "1",
            "--skip-bids-validation",
            "-w",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    assert all(not (out / f).is_symlink() for f in files)
    assert not [f for f in files if f.endswith((".tmp", ".part", ".lock"))]
    others = [f for f in files if f.startswith("sub-") and not f.startswith("sub-03")]
    assert not others, "another participant's file"
    assert "sub-03.html" in files and [f for f in files if f.startswith("sub-03/figures/")]
    assert {".bidsignore", "dataset_description.json", "seg-DLMUSE_dseg.tsv"} <= set(files)
    assert len([f for f in files if f.startswith("sub-03/anat/")]) == 6
    archive = tmp_path / "dlmuse.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(out / f, f"dlmuse/{f}")
    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
        assert all(not Path(n).is_absolute() and ".." not in n for n in zf.namelist())
