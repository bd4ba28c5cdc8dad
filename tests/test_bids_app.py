"""End to end: ``dlmuse-bids`` on small BIDS datasets made from real scans, tiny models."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids.bids import output_paths
from dlmuse_bids.execution import Progress
from dlmuse_bids.labels import volume_roi_ids, volume_roi_members
from dlmuse_bids.template import TEMPLATE, read_itk_affine
from dlmuse_bids.workflows import SINK_NODES
from tests.conftest import needs_shared
from tests.support.bids import STANDARD_T1W, make_dataset, run_app
from tests.support.templates import make_templateflow_home

pytestmark = needs_shared

needs_validator = pytest.mark.skipif(
    shutil.which("bids-validator-deno") is None, reason="bids-validator-deno not on PATH"
)
FAST = ["--no-tta", "--device", "cpu", "--skip-bids-validation"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


_run = run_app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("raw") / "ds")


@pytest.fixture(scope="module")
def first_run(dataset, tiny_models, tmp_path_factory):
    """One participant-level run over the whole standard dataset (MultiProc, 2 workers)."""
    out = tmp_path_factory.mktemp("deriv") / "dlmuse"
    code = _run(dataset, out, *FAST, "--nprocs", "2", "--omp-nthreads", "1", models=tiny_models)
    return {"code": code, "out": out}


def test_participant_level_outputs(first_run, dataset):
    assert first_run["code"] == 0
    out = first_run["out"]
    for rel, _ in STANDARD_T1W:
        source = dataset / rel
        paths = output_paths(source, out)
        xfm = paths.pop("xfm")
        assert all(p.is_file() for p in paths.values()), rel
        assert not xfm.exists(), "no template: no transform"
        qc_row = pd.read_csv(paths["qc"], sep="\t", na_values="n/a").iloc[0]
        assert qc_row["template_check"] == "skipped: TEMPLATEFLOW_HOME is not set"
        src = nib.load(source)
        for key in ("dseg", "mask"):
            img = nib.load(paths[key])
            assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-6)
            assert np.array_equal(img.header.get_sform(), src.header.get_sform())
            assert img.get_data_dtype() == np.uint8
        labels = np.asarray(nib.load(paths["dseg"]).dataobj)
        mask = np.asarray(nib.load(paths["mask"]).dataobj)
        assert set(np.unique(mask)) <= {0, 1}
        assert np.all(labels[mask > 0] > 0), "every ICV voxel has a label (1 at least)"
        meta = json.loads(paths["dseg_json"].read_text())
        assert meta["Sources"] == [f"bids:raw:{rel}"]
        assert meta["InferenceMode"] == "default"
        assert [meta["Inference"][n]["TestTimeAugmentation"] for n in ("DLICV", "DLMUSE")] == [
            False,
            False,
        ]
        assert meta["Inference"]["DLMUSE"]["Precision"] == "fp32"  # DLMUSE as nnU-Net runs it
        assert set(meta["Models"]) == {"DLICV", "DLMUSE"}
        assert len(meta["Models"]["DLMUSE"]["CheckpointSHA256"]["fold_0"]) == 64
        table = pd.read_csv(paths["volumes"], sep="\t", na_values="n/a")
        assert list(table.columns) == ["index", "name", "volume_mm3", "n_voxels"]
        voxel = float(np.prod(src.header.get_zooms()[:3]))
        icv = table.loc[table["index"] == 702, "volume_mm3"].item()
        members = volume_roi_members()[702]  # ICV as NiChart sums it, from the label map
        assert icv == pytest.approx(np.isin(labels, members).sum() * voxel)
    names = sorted(p.name for p in out.rglob("*_dseg.nii.gz"))
    assert "sub-01_ses-2_acq-fast_seg-DLMUSE_dseg.nii.gz" in names
    assert "sub-01_ses-1_run-2_seg-DLMUSE_dseg.nii.gz" in names
    assert not (out / "logs").exists()
    for subject in ("01", "02", "03"):  # a report per subject, linking its images' outputs
        html = (out / f"sub-{subject}.html").read_text()
        assert html.count("<img class=mosaic") == sum(
            rel.startswith(f"sub-{subject}/") for rel, _ in STANDARD_T1W
        )


def test_output_is_a_derivative_dataset(first_run):
    from bids.layout import BIDSLayout

    out = first_run["out"]
    layout = BIDSLayout(out, validate=False, is_derivative=True)
    dsegs = layout.get(suffix="dseg", extension=".nii.gz")
    assert len(dsegs) == len(STANDARD_T1W)
    ents = {
        (f.entities.get("subject"), f.entities.get("session"), f.entities.get("run"))
        for f in dsegs
    }
    assert ("01", "1", 2) in ents
    masks = layout.get(suffix="mask", desc="icv", extension=".nii.gz")
    assert len(masks) == len(STANDARD_T1W)
    acq = layout.get(suffix="dseg", acquisition="fast", extension=".nii.gz")
    assert len(acq) == 1 and acq[0].entities["session"] == "2"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


@pytest.mark.skipif(
    shutil.which("bids-validator-deno") is None, reason="bids-validator-deno absent"
)
def test_output_passes_the_bids_validator(first_run):
    proc = subprocess.run(
        ["bids-validator-deno", "--format", "json", str(first_run["out"])],
        capture_output=True,
        text=True,
        check=False,
    )
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors, errors[:5]


def test_rerun_skips_everything(first_run, dataset, tiny_models, capsys):
    out = first_run["out"]
    before = _snapshot(out)
    code = _run(dataset, out, *FAST, "--nipype-plugin", "Linear", models=tiny_models)
    assert code == 0
    assert _snapshot(out) == before  # not a file rewritten: nothing was recomputed
    assert f"0 processed, {len(STANDARD_T1W)} skipped" in capsys.readouterr().err


def test_overwrite_and_provenance_change_recompute(
    first_run, dataset, tiny_models, tmp_path, capsys
):
    out = tmp_path / "out"  # a copy: the module's outputs stay as the other tests expect them
    shutil.copytree(first_run["out"], out, symlinks=True)
    dseg = output_paths(dataset / STANDARD_T1W[3][0], out)["dseg"]
    other = output_paths(dataset / STANDARD_T1W[4][0], out)["dseg"]
    other_before = other.stat().st_mtime_ns
    mtime = dseg.stat().st_mtime_ns
    args = [*FAST, "--participant-label", "sub-02", "--nipype-plugin", "Linear"]
    assert _run(dataset, out, *args, "--overwrite", models=tiny_models) == 0
    assert dseg.stat().st_mtime_ns > mtime
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    # another tile step is another provenance: recomputed without --overwrite
    assert _run(dataset, out, *args, "--step-size", "0.75", models=tiny_models) == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    assert (
        json.loads(dseg.with_suffix("").with_suffix(".json").read_text())["Inference"]["DLICV"][
            "TileStepSize"
        ]
        == 0.75
    )
    assert other.stat().st_mtime_ns == other_before, "another image's outputs were touched"


def test_group_level(first_run, dataset, tiny_models, tmp_path):
    out = tmp_path / "out"  # a copy: the group level writes group/ into its output dataset
    shutil.copytree(first_run["out"], out, symlinks=True)
    assert _run(dataset, out, models=tiny_models, level="group") == 0
    assert "<h1>DLMUSE group report</h1>" in (out / "group" / "dlmuse_report.html").read_text()
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t", na_values="n/a")
    assert len(table) == len(STANDARD_T1W)
    assert list(table.columns[:8]) == [
        "participant_id",
        "session_id",
        "acq",
        "ce",
        "rec",
        "run",
        "source",
        "status",
    ]
    assert {"age", "sex", "ICV", "GM", "3rd_ventricle"} <= set(table.columns)
    assert (table["status"] == "ok").all()
    assert sorted(table["source"]) == sorted(rel for rel, _ in STANDARD_T1W)
    norm = pd.read_csv(out / "group" / "dlmuse_volumes_icvnorm.tsv", sep="\t")
    assert np.allclose(norm["ICV"], 1.0)
    summary = pd.read_csv(out / "group" / "dlmuse_volumes_summary.tsv", sep="\t")
    icv = summary.set_index("roi").loc["ICV"]
    assert icv["n"] == len(STANDARD_T1W)
    assert icv["mean"] == pytest.approx(table["ICV"].mean())
    qc_table = pd.read_csv(out / "group" / "dlmuse_qc.tsv", sep="\t", keep_default_na=False)
    assert len(qc_table) == len(STANDARD_T1W)
    assert {"icv_l", "brain_icv_ratio", "qc_flags", "orientation"} <= set(qc_table.columns)
    assert set(qc_table["orientation"]) >= {"LIA"}  # sub-02 is the FreeSurfer-conformed scan
    nichart = pd.read_csv(out / "group" / "DLMUSE_Volumes.csv", dtype={"MRID": str})
    assert len(nichart) == len(STANDARD_T1W)
    assert list(nichart.columns[1:]) == [f"DL_MUSE_Volume_{i}" for i in volume_roi_ids()]
    assert "sub-01_ses-1_run-2" in set(nichart["MRID"])


def test_one_broken_t1w(tiny_models, tmp_path, capsys):
    files = [STANDARD_T1W[3], STANDARD_T1W[4]]
    raw = make_dataset(tmp_path / "raw", files)
    broken = raw / "sub-03/anat/sub-03_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:5000])  # a truncated gzip
    out = tmp_path / "out"
    code = _run(raw, out, *FAST, "--nipype-plugin", "Linear", models=tiny_models)
    assert code == 1
    assert output_paths(raw / files[0][0], out)["dseg"].is_file()
    assert not output_paths(broken, out)["dseg"].exists()
    crashes = list((out / "logs").glob("crash-*-sub-03_T1w-*.txt"))
    assert len(crashes) == 1
    assert "Traceback" in crashes[0].read_text()
    err = capsys.readouterr().err
    assert "1 processed, 0 skipped (outputs up to date), 1 failed" in err
    failed = [ln for ln in err.splitlines() if ln.startswith("dlmuse-bids: failed:")]
    assert len(failed) == 1 and str(broken) in failed[0] and "gzip" in failed[0].lower()
    # the group table keeps the failed image, with its status
    assert _run(raw, out, models=tiny_models, level="group") == 0
    table = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t")
    assert dict(zip(table["participant_id"], table["status"], strict=True)) == {
        "sub-02": "ok",
        "sub-03": "failed",
    }


def test_stop_on_first_crash(tiny_models, tmp_path, capsys):
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3], STANDARD_T1W[4]])
    first = raw / "sub-02/anat/sub-02_T1w.nii.gz"
    first.write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    args = [*FAST, "--nipype-plugin", "Linear", "--stop-on-first-crash"]
    assert _run(raw, out, *args, models=tiny_models) == 1
    assert not list(out.rglob("*_dseg.nii.gz"))
    err = capsys.readouterr().err
    assert "0 processed, 0 skipped (outputs up to date), 2 failed" in err
    assert "sub-03_T1w.nii.gz: not run: stopped at the first failure" in err
    assert len(list((out / "logs").glob("crash-*-sub-02_T1w-*.txt"))) == 1


@pytest.fixture
def small_dataset(tmp_path):
    return make_dataset(tmp_path / "raw", [STANDARD_T1W[3]])


def test_participant_and_session_labels(tiny_models, tmp_path, capsys):
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[0], STANDARD_T1W[2]])
    out = tmp_path / "out"
    code = _run(raw, out, *FAST, "--participant-label", "sub-99", "03", models=tiny_models)
    assert code == 18
    err = capsys.readouterr().err
    assert "participant label(s) not found: 03 99" in err and "mounted" in err
    assert _run(raw, out, *FAST, "--session-label", "ses-7", models=tiny_models) == 18
    assert "session label(s) not found: 7" in capsys.readouterr().err
    # without prefixes, and with a work dir that keeps nipype's cache
    args = [*FAST, "--participant-label", "01", "--session-label", "2", "-w", str(tmp_path / "w")]
    assert _run(raw, out, *args, "--nipype-plugin", "Linear", models=tiny_models) == 0
    made = sorted(p.name for p in out.rglob("*_dseg.nii.gz"))
    assert made == ["sub-01_ses-2_acq-fast_seg-DLMUSE_dseg.nii.gz"]
    # an interrupted run resumes from the cache: the networks do not run again
    results = sorted((tmp_path / "w").rglob("dlicv/result_dlicv.pklz"))
    assert len(results) == 1
    stamp = results[0].stat().st_mtime_ns
    for path in out.rglob("sub-01_ses-2_acq-fast_*"):
        path.unlink()
    assert _run(raw, out, *args, "--nipype-plugin", "Linear", models=tiny_models) == 0
    assert results[0].stat().st_mtime_ns == stamp
    assert len(list(out.rglob("sub-01_ses-2_acq-fast_*"))) == 7  # 6 outputs and the figure


def test_list_participants_prints_the_selection_and_writes_nothing(
    dataset, tiny_models, tmp_path, capsys
):
    """One label per line for a job array: the filters apply, the output dir is not made."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert _run(dataset, out, "--list-participants", models=tiny_models) == 0
    assert capsys.readouterr().out.splitlines() == ["01", "02", "03"]
    filt = tmp_path / "filter.json"
    filt.write_text('{"acquisition": "fast"}')
    args = ["--list-participants", "--bids-filter-file", str(filt)]
    assert _run(dataset, out, *args, models=tiny_models) == 0
    assert capsys.readouterr().out.splitlines() == ["01"]
    args = ["--list-participants", "--session-label", "2"]
    assert _run(dataset, out, *args, models=tiny_models) == 0
    assert capsys.readouterr().out.splitlines() == ["01"]
    args = ["--list-participants", "--participant-label", "sub-03", "02"]
    assert _run(dataset, out, *args, models=tiny_models) == 0
    assert capsys.readouterr().out.splitlines() == ["02", "03"]
    args = ["--list-participants", "--participant-label", "99"]
    assert _run(dataset, out, *args, models=tiny_models) == 18
    captured = capsys.readouterr()
    assert captured.out == "" and "participant label(s) not found: 99" in captured.err
    assert not out.exists()


def test_template_check_end_to_end(small_dataset, tiny_models, tmp_path, capsys):
    """With a TemplateFlow home the transform is written; the template is part of provenance."""
    env = {"TEMPLATEFLOW_HOME": str(make_templateflow_home(tmp_path / "templateflow"))}
    out = tmp_path / "out"
    args = [*FAST, "--nipype-plugin", "Linear"]
    assert _run(small_dataset, out, *args, models=tiny_models, env=env) == 0
    paths = output_paths(small_dataset / STANDARD_T1W[3][0], out)
    assert all(p.is_file() for p in paths.values())
    assert read_itk_affine(paths["xfm"].read_text()).shape == (4, 4)
    qc_row = pd.read_csv(paths["qc"], sep="\t", na_values="n/a").iloc[0]
    assert qc_row["template_check"] == TEMPLATE
    assert json.loads(paths["dseg_json"].read_text())["TemplateCheck"] == TEMPLATE
    if shutil.which("bids-validator-deno"):  # the transform's name is valid BIDS
        proc = subprocess.run(
            ["bids-validator-deno", "--format", "json", str(out)], capture_output=True, text=True
        )
        issues = json.loads(proc.stdout)["issues"]["issues"]
        assert not [i for i in issues if i["severity"] == "error"], issues[:5]
    capsys.readouterr()
    assert _run(small_dataset, out, *args, models=tiny_models, env=env) == 0
    assert "0 processed, 1 skipped" in capsys.readouterr().err
    # the template went away: the outputs no longer match this run's provenance
    assert _run(small_dataset, out, *args, models=tiny_models) == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().err
    assert json.loads(paths["dseg_json"].read_text())["TemplateCheck"] is None


def test_exit_codes(small_dataset, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(small_dataset, out, models=tiny_models, level="everything") == 17
    with pytest.raises(SystemExit) as exc:
        _run(small_dataset, out, "--no-such-option", models=tiny_models)
    assert exc.value.code == 64
    assert _run(small_dataset, small_dataset, *FAST, models=tiny_models) == 64
    assert _run(tmp_path / "nowhere", out, *FAST, models=tiny_models) == 66
    assert _run(small_dataset, out, *FAST, models=tmp_path / "no-models") == 66
    assert "DLICV model not found" in capsys.readouterr().err
    not_bids = tmp_path / "not_bids"
    not_bids.mkdir()
    assert _run(not_bids, out, *FAST, models=tiny_models) == 16
    filt = tmp_path / "filter.json"
    filt.write_text('{"acquisiton": "x"}')
    assert (
        _run(small_dataset, out, *FAST, "--bids-filter-file", str(filt), models=tiny_models) == 64
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert _run(small_dataset, a_file / "out", *FAST, models=tiny_models) == 73
    assert "not writable" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("bids-validator-deno") is None, reason="bids-validator-deno absent"
)
def test_invalid_bids_input_exits_16(tmp_path, tiny_models, capsys):
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3]])
    (raw / "dataset_description.json").write_text('{"Name": "x"}')  # no BIDSVersion
    assert _run(raw, tmp_path / "out", "--no-tta", models=tiny_models) == 16
    assert "not valid BIDS" in capsys.readouterr().err


class _Node:
    def __init__(self, wf, name):
        self.name = name
        self.fullname = f"dlmuse_bids_wf.{wf}.{name}"


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_progress_lines(tty):
    images = {"t1w_a_wf": Path("a_T1w.nii.gz"), "t1w_b_wf": Path("b_T1w.nii")}
    stream = _Stream(tty)
    written: list[Path] = []
    progress = Progress(images, stream, on_done=written.append)
    progress(_Node("t1w_a_wf", "reorient"), "start")
    progress(_Node("t1w_b_wf", "reorient"), "start")
    progress(_Node("t1w_b_wf", "dlicv"), "exception")
    for sink in SINK_NODES:
        progress(_Node("t1w_a_wf", sink), "end")
    progress(_Node("t1w_b_wf", "ds_dseg"), "end")  # after the failure: ignored
    text = stream.getvalue()
    assert re.search(r"\[1/2\] b_T1w.nii: failed in \d+ s", text)
    assert re.search(r"\[2/2\] a_T1w.nii.gz: done in \d+ s", text)
    assert ("images" in text) is tty  # the bar only on a terminal
    assert written == [images["t1w_a_wf"]]  # told once, of the image written, not the failed


def test_a_study_runs_in_batches_of_images(tmp_path, tiny_models, capsys, monkeypatch):
    """nipype's cost grows faster than a workflow: the local plugins get images in batches."""
    from dlmuse_bids import execution

    monkeypatch.setattr(execution, "BATCH_IMAGES", 1)
    monkeypatch.setattr(execution, "BATCH_IMAGES_PER_PROCESS", 1)
    built = []
    real = execution.run_workflow

    def counted(wf, images, *args, **kwargs):
        built.append(sorted(p.name for p in images.values()))
        return real(wf, images, *args, **kwargs)

    monkeypatch.setattr(execution, "run_workflow", counted)
    files = STANDARD_T1W[3:5] + [("sub-04/anat/sub-04_T1w.nii.gz", STANDARD_T1W[0][1])]
    raw = make_dataset(tmp_path / "raw", files)
    out = tmp_path / "out"
    assert _run(raw, out, *FAST, "--nprocs", "1", models=tiny_models) == 0
    err = capsys.readouterr().err
    assert built == [["sub-02_T1w.nii.gz"], ["sub-03_T1w.nii.gz"], ["sub-04_T1w.nii.gz"]]
    assert "3 processed, 0 skipped (outputs up to date), 0 failed" in err
    for n, name in enumerate(["sub-02_T1w.nii.gz", "sub-03_T1w.nii.gz", "sub-04_T1w.nii.gz"]):
        assert f"[{n + 1}/3] {name}: done in" in err  # one count over all the batches
