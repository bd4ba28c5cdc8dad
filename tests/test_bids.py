"""dlmuse_bids.bids: discovery, derivative names, dataset files, provenance."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from dlmuse_bids import bids
from dlmuse_bids.labels import single_roi_ids


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}" if rel.endswith(".json") else b"")


@pytest.fixture
def skeleton(tmp_path) -> Path:
    """File names only (pybids indexes names): subjects, sessions, runs, variants, noise."""
    root = tmp_path / "ds"
    _touch(
        root,
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_T1w.nii",
        "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz",
        "sub-01/ses-2/func/sub-01_ses-2_task-rest_bold.nii.gz",
        "sub-02/anat/sub-02_ce-gd_rec-norm_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.json",
        "sub-10/anat/sub-10_T1w.nii.gz",
        "derivatives/other/sub-01/anat/sub-01_T1w.nii.gz",
        "sourcedata/sub-01_T1w.nii.gz",
    )
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    return root


def _rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_every_t1w_is_found_and_nothing_else(skeleton):
    layout = bids.index_layout(skeleton)
    found = _rel(bids.collect_t1w(layout), skeleton)
    assert found == [
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_T1w.nii",
        "sub-02/anat/sub-02_ce-gd_rec-norm_T1w.nii.gz",
        "sub-10/anat/sub-10_T1w.nii.gz",
    ]


def test_index_skips_other_subjects_and_datatypes(skeleton):
    layout = bids.index_layout(skeleton, participants=["01"])
    indexed = _rel([Path(f) for f in layout.get(return_type="filename")], skeleton)
    assert not [f for f in indexed if "sub-02" in f or "sub-10" in f]
    assert not [f for f in indexed if "/func/" in f]
    assert "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz" in indexed
    # "sub-1" must not select sub-10
    layout = bids.index_layout(skeleton, participants=["1"])
    assert layout.get_subjects() == []


def test_labels_sessions_and_filters(skeleton):
    layout = bids.index_layout(skeleton)
    only_ses2 = bids.collect_t1w(layout, ["01"], ["2"])
    assert _rel(only_ses2, skeleton) == ["sub-01/ses-2/anat/sub-01_ses-2_acq-fast_T1w.nii"]
    no_acq = bids.collect_t1w(layout, ["01"], [], {"acquisition": None})
    assert len(no_acq) == 2 and all("acq-" not in p.name for p in no_acq)
    fmriprep_style = bids.collect_t1w(layout, [], [], {"ceagent": "gd"})
    assert _rel(fmriprep_style, skeleton) == ["sub-02/anat/sub-02_ce-gd_rec-norm_T1w.nii.gz"]
    assert len(bids.collect_t1w(layout, ["02", "10"])) == 2


def test_no_t1w_names_the_missing_labels(skeleton):
    layout = bids.index_layout(skeleton)
    with pytest.raises(bids.NoT1wError) as err:
        bids.collect_t1w(layout, ["01", "99"], ["7"])
    message = str(err.value)
    assert "participant label(s) not found: 99" in message
    assert "session label(s) not found: 7" in message
    assert "mounted" in message and err.value.exit_code == 18
    with pytest.raises(bids.NoT1wError, match="filters"):
        bids.collect_t1w(layout, [], [], {"acquisition": "nonexistent"})


def test_unknown_filter_entity_is_a_usage_error(skeleton):
    layout = bids.index_layout(skeleton)
    with pytest.raises(bids.FilterError) as err:
        bids.collect_t1w(layout, [], [], {"acqusition": "fast"})
    assert err.value.exit_code == 64


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(bids.BIDSError, match="dataset_description.json") as err:
        bids.index_layout(tmp_path)
    assert err.value.exit_code == 16


def test_database_dir_is_reused_per_selection(skeleton, tmp_path):
    db = tmp_path / "db"
    first = bids.index_layout(skeleton, ["01"], db)
    assert len(bids.collect_t1w(first)) == 3
    second = bids.index_layout(skeleton, ["02"], db)  # a different selection: its own index
    assert len(bids.collect_t1w(second)) == 1
    assert len(list(db.iterdir())) == 2
    again = bids.index_layout(skeleton, ["01"], db)
    assert len(bids.collect_t1w(again)) == 3


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"acquisition": "fast"}, {"acquisition": "fast"}),
        ({"t1w": {"run": 1, "session": None}}, {"run": 1, "session": None}),
    ],
)
def test_load_bids_filters(tmp_path, filters, expected):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(filters))
    assert bids.load_bids_filters(path) == expected


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"suffix": "T2w"}'])
def test_bad_filter_files(tmp_path, content):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(bids.FilterError, match="f.json"):
        bids.load_bids_filters(path)


def test_derivative_names_keep_every_source_entity(tmp_path):
    source = tmp_path / "sub-01/ses-A/anat/sub-01_ses-A_acq-mp_ce-gd_rec-nd_run-01_echo-2_T1w.nii"
    paths = bids.output_paths(source, tmp_path / "out")
    stem = "sub-01/ses-A/anat/sub-01_ses-A_acq-mp_ce-gd_rec-nd_run-01_echo-2"
    rel = {k: p.relative_to(tmp_path / "out").as_posix() for k, p in paths.items()}
    assert rel == {
        "dseg": f"{stem}_seg-DLMUSE_dseg.nii.gz",
        "dseg_json": f"{stem}_seg-DLMUSE_dseg.json",
        "mask": f"{stem}_desc-icv_mask.nii.gz",
        "mask_json": f"{stem}_desc-icv_mask.json",
        "volumes": f"{stem}_seg-DLMUSE_volumes.tsv",
        "qc": f"{stem}_seg-DLMUSE_qc.tsv",
        "xfm": f"{stem}_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt",
    }
    plain = bids.output_paths(tmp_path / "sub-2/anat/sub-2_T1w.nii.gz", tmp_path)["mask"]
    assert plain == tmp_path / "sub-2/anat/sub-2_desc-icv_mask.nii.gz"


def test_bids_uri(tmp_path):
    source = tmp_path / "raw" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert bids.bids_uri(source, tmp_path / "raw") == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"


def test_dataset_files(tmp_path, skeleton):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".bidsignore").write_text("mine/\n")
    bids.write_dataset_files(out, skeleton, "1.2.3", {"Type": "docker", "Tag": "dlmuse:1"})
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0] == {
        "Name": "dlmuse-bids",
        "Version": "1.2.3",
        "CodeURL": bids.CODE_URL,
        "Container": {"Type": "docker", "Tag": "dlmuse:1"},
    }
    assert desc["SourceDatasets"] == [{"URL": skeleton.absolute().as_uri()}]
    assert desc["DatasetLinks"] == {"raw": skeleton.absolute().as_uri()}
    assert (out / ".bidsignore").read_text().splitlines() == ["mine/", *bids.BIDSIGNORE]
    table = pd.read_csv(out / bids.DSEG_TSV, sep="\t")
    assert list(table.columns) == ["index", "name", "abbreviation", "color"]
    assert table["index"].tolist() == [0, *single_roi_ids()]
    assert 1 in table["index"].tolist()
    assert table["color"].str.fullmatch(r"#[0-9a-f]{6}").all()

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bids.write_dataset_files(out, skeleton, "9.9.9")  # a later version keeps what is there
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_dataset_files_under_parallel_jobs(tmp_path, skeleton):
    out = tmp_path / "out"
    out.mkdir()
    errors = []

    def job(version):
        try:
            bids.write_dataset_files(out, skeleton, version)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(f"1.{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Version"].startswith("1.")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _provenance(**changes):
    base = dict(
        version="1.0",
        inference={
            name: {"TestTimeAugmentation": True, "TileStepSize": 0.5, "Precision": "fp32"}
            for name in ("DLICV", "DLMUSE")
        },
        models={
            "DLICV": {"Folds": [0], "CheckpointSHA256": {"fold_0": "aa"}},
            "DLMUSE": {"Folds": [0], "CheckpointSHA256": {"fold_0": "bb"}},
        },
    )
    base.update(changes)
    return bids.Provenance(**base)


def test_provenance_matching(tmp_path):
    prov = _provenance()
    sidecar = json.loads(json.dumps(prov.metadata()))
    assert prov.matches(sidecar)
    assert not _provenance(version="1.1").matches(sidecar)
    no_tta = {
        **prov.inference,
        "DLICV": {**prov.inference["DLICV"], "TestTimeAugmentation": False},
    }
    assert not _provenance(inference=no_tta).matches(sidecar)
    assert _provenance(mode="exact").matches(sidecar)  # the options decide, not the preset name
    other = {"DLICV": {"CheckpointSHA256": {"fold_0": "cc"}}, "DLMUSE": prov.models["DLMUSE"]}
    assert not _provenance(models=other).matches(sidecar)


def test_outputs_current(tmp_path):
    prov = _provenance()
    source = tmp_path / "raw/sub-01/anat/sub-01_T1w.nii.gz"
    paths = bids.output_paths(source, tmp_path / "out")
    mosaic = bids.figure_paths(source, tmp_path / "out")["mosaic"]
    assert not bids.outputs_current(source, tmp_path / "out", prov)
    for key, path in [*paths.items(), ("mosaic", mosaic)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if key.endswith("json"):
            bids.write_json_atomic(path, prov.metadata())
        else:
            path.write_bytes(b"x")
    assert bids.outputs_current(source, tmp_path / "out", prov)
    assert not bids.outputs_current(source, tmp_path / "out", _provenance(inference={}))
    mosaic.unlink()  # a run stopped while the mosaic was drawn: not finished
    assert not bids.outputs_current(source, tmp_path / "out", prov)
    mosaic.write_bytes(b"x")
    paths["volumes"].unlink()
    assert not bids.outputs_current(source, tmp_path / "out", prov)


def test_crash_log_names_match_their_glob(tmp_path):
    source = Path("sub-01_ses-1_run-2_T1w.nii.gz")
    name = bids.crash_log_name(source, "dlicv", "20260101-120000")
    assert name == "crash-20260101-120000-sub-01_ses-1_run-2_T1w-dlicv.txt"
    (tmp_path / name).touch()
    assert list(tmp_path.glob(bids.crash_log_glob(source)))
    assert not list(tmp_path.glob(bids.crash_log_glob(Path("sub-01_ses-1_T1w.nii.gz"))))


def test_a_killed_writers_temporaries_are_removed_for_its_image_only(tmp_path):
    out = tmp_path / "out"
    anat = tmp_path / "raw" / "sub-01" / "anat"
    source, other = anat / "sub-01_run-1_T1w.nii.gz", anat / "sub-01_run-2_T1w.nii.gz"
    mine, theirs = (bids.output_paths(s, out)["dseg"] for s in (source, other))
    mine.parent.mkdir(parents=True)
    # a writer killed between writing its temporary and renaming it
    script = (
        "import os, signal, sys\n"
        "from dlmuse_bids.atomic import write_bytes_atomic\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_bytes_atomic(sys.argv[1], b'half')\n"
    )
    for path in (mine, theirs):
        killed = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
        assert killed.returncode == -signal.SIGKILL
    assert len(list(mine.parent.glob(".*.tmp"))) == 2
    removed = bids.remove_leftovers(source, out)
    assert [p.name.startswith(f".{mine.name}.") for p in removed] == [True]
    left = list(mine.parent.glob(".*.tmp"))
    assert len(left) == 1 and left[0].name.startswith(f".{theirs.name}.")
    assert not mine.exists() and bids.remove_leftovers(source, out) == []
    mosaic = bids.figure_paths(source, out)["mosaic"]  # the report's figure, the last written
    mosaic.parent.mkdir(parents=True)
    killed = subprocess.run([sys.executable, "-c", script, str(mosaic)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.parent for p in bids.remove_leftovers(source, out)] == [mosaic.parent]
    assert not list(mosaic.parent.glob(".*.tmp"))
