"""The ``dlmuse`` command: outputs, NiChart's CSV layout, bad input, exit codes, equivariance."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids.cli import dlmuse_main
from dlmuse_bids.io import nifti_stem
from dlmuse_bids.labels import nichart_columns, nichart_mrid
from tests.conftest import synthetic_head
from tests.support.geometry import reoriented, world_labels
from tests.support.paths import DLMUSE_DATASET, TRAINED_MODEL_SUBDIR


def _run(*args: str | Path) -> int:
    return dlmuse_main([str(a) for a in args])


def test_names_and_subject_ids():
    assert nichart_mrid(Path("sub-01_T1w.nii.gz")) == "sub-01"
    assert nichart_mrid(Path("/x/Subj1_T1.nii")) == "Subj1"
    assert nichart_mrid(Path("a_T1w_run-1.nii.gz")) == "a_T1w_run-1"
    assert nifti_stem(Path("sub-01_T1w.nii.gz")) == "sub-01_T1w"


def test_usage_errors_exit_64(capsys):
    with pytest.raises(SystemExit) as err:
        dlmuse_main(["run", "--bogus"])
    assert err.value.code == 64
    with pytest.raises(SystemExit) as err:
        dlmuse_main(["predict", "a.nii", "b.nii", "--model", "m", "--step-size", "2"])
    assert err.value.code == 64


def test_missing_models_exit_66(head_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DLMUSE_MODEL_DIR", raising=False)
    code = _run("run", head_file, "-o", tmp_path / "out", "--model-dir", tmp_path / "none")
    err = capsys.readouterr().err
    assert code == 66
    assert str(tmp_path / "none") in err and str(tmp_path / "cache") in err


def test_run_writes_nichart_outputs_and_survives_bad_inputs(
    tiny_models, head_file, tmp_path, capsys
):
    indir = head_file.parent
    second = indir / "Subj2_T1.nii"
    nib.save(synthetic_head(seed=1), second)
    bad = {
        "missing": indir / "gone_T1w.nii.gz",
        "text": indir / "notes_T1w.nii.gz",
        "truncated": indir / "cut_T1w.nii.gz",
        "2d": indir / "flat_T1w.nii.gz",
        "4d": indir / "multi_T1w.nii.gz",
        "zeros": indir / "zeros_T1w.nii.gz",
        "nan": indir / "nan_T1w.nii.gz",
    }
    bad["text"].write_bytes(gzip.compress(b"not an image"))
    bad["truncated"].write_bytes(head_file.read_bytes()[:5000])
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.float32), np.eye(4)), bad["2d"])
    nib.save(nib.Nifti1Image(np.ones((40, 40, 40, 2), np.float32), np.eye(4)), bad["4d"])
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4)), bad["zeros"])
    nan = np.asarray(synthetic_head().dataobj).copy()
    nan[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), bad["nan"])
    out = tmp_path / "out"
    code = _run(
        "run",
        head_file,
        *bad.values(),
        second,
        "-o",
        out,
        "--model-dir",
        tiny_models,
        "--no-tta",
        "--threads",
        "2",
    )
    err = capsys.readouterr().err
    assert code == 1
    for path in bad.values():
        lines = [line for line in err.splitlines() if str(path) in line and "failed:" not in line]
        assert len(lines) == 1, (path, err)
    for name, mrid in (("sub-01_T1w", "sub-01"), ("Subj2_T1", "Subj2")):
        src = nib.load(indir / (name + (".nii.gz" if name.startswith("sub") else ".nii")))
        for suffix in ("_DLICV.nii.gz", "_DLMUSE.nii.gz"):
            img = nib.load(out / f"{name}{suffix}")
            assert img.shape == src.shape and img.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(img.affine, src.affine)
        per = pd.read_csv(out / f"{name}_DLMUSE_Volumes.csv")
        assert list(per.columns) == nichart_columns() and per["MRID"].tolist() == [mrid]
        labels = np.asarray(nib.load(out / f"{name}_DLMUSE.nii.gz").dataobj)
        assert per["DL_MUSE_Volume_4"].iloc[0] == np.count_nonzero(labels == 4) * 8.0
    combined = pd.read_csv(out / "DLMUSE_Volumes.csv")
    assert combined["MRID"].tolist() == ["sub-01", "Subj2"]
    assert list(combined.columns) == nichart_columns()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left


def test_outputs_made_with_the_same_settings_are_kept(tiny_models, head_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("run", head_file, "-o", out, "--model-dir", tiny_models, "--no-tta")
    assert _run(*args) == 0
    seg = out / "sub-01_T1w_DLMUSE.nii.gz"
    provenance = json.loads((out / "sub-01_T1w_DLMUSE.json").read_text())
    for how in provenance["Inference"].values():
        assert how["TestTimeAugmentation"] is False and how["TileStepSize"] == 0.5
    assert provenance["Sources"] == [str(head_file)]
    os.utime(seg, (1_000_000_000, 1_000_000_000))
    capsys.readouterr()
    assert _run(*args) == 0
    assert seg.stat().st_mtime == 1_000_000_000
    assert "0 processed, 1 skipped" in capsys.readouterr().err
    assert pd.read_csv(out / "DLMUSE_Volumes.csv")["MRID"].tolist() == ["sub-01"]
    # other settings made other outputs: recomputed, and the sidecar says how
    assert _run(*args, "--step-size", "0.75") == 0
    assert seg.stat().st_mtime > 1_000_000_000
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    how = json.loads((out / "sub-01_T1w_DLMUSE.json").read_text())["Inference"]
    assert how["DLICV"]["TileStepSize"] == how["DLMUSE"]["TileStepSize"] == 0.75
    os.utime(seg, (1_000_000_000, 1_000_000_000))
    assert _run(*args, "--step-size", "0.75", "--overwrite") == 0
    assert seg.stat().st_mtime > 1_000_000_000
    # outputs without their provenance (an interrupted or older run) are recomputed
    (out / "sub-01_T1w_DLMUSE.json").unlink()
    capsys.readouterr()
    assert _run(*args) == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    dup = tmp_path / "other" / head_file.name
    dup.parent.mkdir()
    dup.write_bytes(head_file.read_bytes())
    assert _run("run", head_file, dup, "-o", out, "--model-dir", tiny_models, "--no-tta") == 1
    assert f"{dup}: same output names as {head_file}; rename one" in capsys.readouterr().err


def test_labels_are_equivariant_in_physical_space(tiny_models, head_file, tmp_path):
    base = nib.load(head_file)
    variants = {"ras": ((0, 1, 2), ()), "psr": ((1, 2, 0), (0, 2)), "lia": ((0, 2, 1), (0, 1))}
    indir = tmp_path / "variants"
    indir.mkdir()
    for name, (perm, flips) in variants.items():
        nib.save(reoriented(base, perm, flips), indir / f"{name}_T1w.nii.gz")
    out = tmp_path / "out"
    assert (
        _run("run", *sorted(indir.iterdir()), "-o", out, "--model-dir", tiny_models, "--no-tta")
        == 0
    )
    ras = world_labels(out / "ras_T1w_DLMUSE.nii.gz", base)
    assert np.count_nonzero(ras) > 1000
    for name in ("psr", "lia"):
        np.testing.assert_array_equal(world_labels(out / f"{name}_T1w_DLMUSE.nii.gz", base), ras)
        np.testing.assert_array_equal(
            world_labels(out / f"{name}_T1w_DLICV.nii.gz", base),
            world_labels(out / "ras_T1w_DLICV.nii.gz", base),
        )
    volumes = pd.read_csv(out / "DLMUSE_Volumes.csv").set_index("MRID")
    assert (volumes.loc["psr"] == volumes.loc["ras"]).all()


def test_predict_one_model(tiny_models, head_file, tmp_path):
    model = tiny_models / DLMUSE_DATASET / TRAINED_MODEL_SUBDIR
    out = tmp_path / "pred.nii.gz"
    assert _run("predict", "--model", model, head_file, out, "--no-tta", "--folds", "0") == 0
    img = nib.load(out)
    assert img.shape == nib.load(head_file).shape
    assert np.asarray(img.dataobj).max() <= 151
    assert _run("predict", "--model", model, tmp_path / "missing.nii.gz", out) == 66


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "dlmuse_bids", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "dlmuse" in result.stdout


def test_a_crash_on_one_image_does_not_stop_the_others(
    tiny_models, head_file, tmp_path, monkeypatch, capsys
):
    from dlmuse_bids import pipeline

    second = head_file.parent / "sub-02_T1w.nii.gz"
    nib.save(synthetic_head(seed=2), second)
    real_run = pipeline.DLMUSEPipeline.run
    calls = []

    def flaky(self, img):
        calls.append(img)
        if len(calls) == 1:
            raise MemoryError("out of memory\nsecond line")
        return real_run(self, img)

    monkeypatch.setattr(pipeline.DLMUSEPipeline, "run", flaky)
    out = tmp_path / "out"
    assert _run("run", head_file, second, "-o", out, "--model-dir", tiny_models, "--no-tta") == 1
    err = capsys.readouterr().err
    assert f"{head_file}: segmentation failed (MemoryError: out of memory)" in err
    assert (out / "sub-02_T1w_DLMUSE.nii.gz").exists()
    assert not (out / "sub-01_T1w_DLMUSE.nii.gz").exists()
    assert pd.read_csv(out / "DLMUSE_Volumes.csv")["MRID"].tolist() == ["sub-02"]


def _three_heads(head_file: Path) -> list[Path]:
    files = [head_file]
    for name in ("sub-02_T1w.nii.gz", "sub-03_T1w.nii.gz"):
        files.append(head_file.with_name(name))
        files[-1].write_bytes(head_file.read_bytes())
    return files


def test_reads_ahead_and_keeps_input_order(tiny_models, head_file, tmp_path, monkeypatch):
    """The next image is read while the current one is segmented; the CSV keeps input order."""
    import threading
    import time

    from dlmuse_bids.pipeline import DLMUSEPipeline
    from dlmuse_bids.runner import nifti as nifti_runner

    events: list[tuple[str, str]] = []
    load, run = nifti_runner.load_t1w, DLMUSEPipeline.run

    def logged_load(path, **kw):
        events.append(("read", Path(path).name, threading.current_thread().name))
        return load(path, **kw)

    def slow_run(self, img):
        name = Path(img.extra["source_path"]).name
        events.append(("start", name, ""))
        time.sleep(0.5)  # long enough for the reader thread to fetch the next image
        result = run(self, img)
        events.append(("end", name, ""))
        return result

    monkeypatch.setattr(nifti_runner, "load_t1w", logged_load)
    monkeypatch.setattr(DLMUSEPipeline, "run", slow_run)
    files = _three_heads(head_file)
    out = tmp_path / "out"
    assert _run("run", files[2], "-o", out, "--model-dir", tiny_models, "--no-tta") == 0
    events.clear()
    assert _run("run", *files, "-o", out, "--model-dir", tiny_models, "--no-tta") == 0
    reads = [e for e in events if e[0] == "read"]
    assert [e[1] for e in reads] == ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"]  # sub-03 kept
    assert all(e[2].startswith("dlmuse-read") for e in reads)
    assert events.index(reads[1]) < events.index(("end", "sub-01_T1w.nii.gz", ""))
    table = pd.read_csv(out / "DLMUSE_Volumes.csv", dtype={"MRID": str})
    assert table["MRID"].tolist() == ["sub-01", "sub-02", "sub-03"]


def test_full_disk_stops_with_a_clear_error(tiny_models, head_file, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing: exit 73, a line naming the folder, no partial or final file."""
    import errno

    import dlmuse_bids.io

    save = dlmuse_bids.io.save_nifti_atomic

    def full_on_second(img, path):
        if "sub-02" in Path(path).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(img, path)

    monkeypatch.setattr(dlmuse_bids.io, "save_nifti_atomic", full_on_second)
    files = _three_heads(head_file)
    out = tmp_path / "out"
    assert _run("run", *files, "-o", out, "--model-dir", tiny_models, "--no-tta") == 73
    err = capsys.readouterr().err
    assert f"dlmuse: {out}: cannot write outputs of {files[1]} (No space left on device)" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "sub-01_T1w_DLICV.nii.gz",
        "sub-01_T1w_DLMUSE.json",
        "sub-01_T1w_DLMUSE.nii.gz",
        "sub-01_T1w_DLMUSE_Volumes.csv",
    ]


def test_third_party_environment_gives_a_home_where_none_resolves(monkeypatch):
    """A container run as a uid with no passwd entry and no HOME: pybids' import needs one."""
    import os
    from pathlib import Path

    from dlmuse_bids.cli.common import third_party_environment

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("NIPYPE_NO_ET", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with third_party_environment():
        home = Path(os.environ["HOME"])
        assert home.is_dir() and not any(home.iterdir())
        assert os.environ["NIPYPE_NO_ET"] == "1"
    assert "HOME" not in os.environ and "NIPYPE_NO_ET" not in os.environ
    assert not home.exists()


def test_third_party_environment_keeps_a_working_home(monkeypatch, tmp_path):
    import os

    from dlmuse_bids.cli.common import third_party_environment

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NIPYPE_NO_ET", "0")
    with third_party_environment():
        assert os.environ["HOME"] == str(tmp_path)
        assert os.environ["NIPYPE_NO_ET"] == "0"
    assert os.environ["HOME"] == str(tmp_path)
