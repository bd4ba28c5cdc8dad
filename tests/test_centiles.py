"""dlmuse_bids.runner.centiles end to end: per-image and group centile tables of a BIDS run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import pandas as pd
import pytest

from dlmuse_bids.bids import centile_paths, output_paths
from dlmuse_bids.norms import AGE_FLAG, COLUMNS
from tests.conftest import needs_shared
from tests.support.bids import make_dataset, run_app
from tests.support.paths import NICHART_NORMS

pytestmark = [
    needs_shared,
    pytest.mark.skipif(not NICHART_NORMS.is_dir(), reason=f"no tables at {NICHART_NORMS}"),
]
FAST = ["--no-tta", "--device", "cpu", "--skip-bids-validation", "--nprocs", "2"]
FILES = [
    ("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-otsu_T1w.nii.gz"),
    ("sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz", "sub-chris_T1w.nii.gz"),
    ("sub-02/anat/sub-02_T1w.nii.gz", "sub-brainchop_T1w.nii.gz"),
    ("sub-03/anat/sub-03_T1w.nii.gz", "sub-dep01_T1w.nii.gz"),
]


def _write_tsv(path, rows):
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory, tiny_models):
    """sub-01: two sessions aged in sessions.tsv; sub-02 younger than the norms; sub-03 ageless."""
    raw = make_dataset(tmp_path_factory.mktemp("raw") / "ds", FILES, participants=False)
    people = [("participant_id", "age", "sex"), ("sub-01", "70", "female")]
    _write_tsv(raw / "participants.tsv", [*people, ("sub-02", "35", "M"), ("sub-03", "n/a", "M")])
    _write_tsv(
        raw / "sub-01" / "sub-01_sessions.tsv",
        [("session_id", "age"), ("ses-1", "70.5"), ("ses-2", "73")],
    )
    out = tmp_path_factory.mktemp("deriv") / "dlmuse"
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        code = run_app(raw, out, *FAST, "--norms-dir", NICHART_NORMS, models=tiny_models)
    assert code == 0, said.getvalue()
    return raw, out, said.getvalue()


def test_participant_and_group_centiles(longitudinal, tiny_models):
    raw, out, err = longitudinal
    sources = {rel.split("/")[-1].split("_T1w")[0]: raw / rel for rel, _ in FILES}
    for key, age, reference in (
        ("sub-01_ses-1", 70.5, "CN-Females"),
        ("sub-01_ses-2", 73, "CN-Females"),
        ("sub-02", 35, "CN-Males"),
    ):
        paths = centile_paths(sources[key], out)
        table = pd.read_csv(paths["centiles"], sep="\t", dtype=str, keep_default_na=False)
        assert list(table.columns) == list(COLUMNS)
        volumes = pd.read_csv(output_paths(sources[key], out)["volumes"], sep="\t")
        assert set(table["index"].astype(int)) == set(volumes["index"]) - {
            1,
            42,
            43,
            46,
            63,
            64,
            69,
            600,
        }
        assert set(table["reference"]) == {reference, "CN-ICVNorm"}
        outside = table["centile"].isin(["<5", ">95"])
        assert (table.loc[~outside, "centile"].astype(float).between(5, 95)).all()
        assert (table.loc[outside, "centile_beyond"] != "n/a").all()
        sidecar = json.loads(paths["centiles_json"].read_text())
        assert sidecar["Age"] == age and sidecar["NormativeTables"]["Commit"]
        assert sidecar["Sources"][0].startswith("bids:raw:")
        assert sidecar["Flags"] == ([AGE_FLAG] if key == "sub-02" else [])
    assert "sub-02_T1w.nii.gz: age 35 is outside the norms' 40-92" in err
    assert not centile_paths(sources["sub-03"], out)["centiles"].exists()
    assert err.count("sub-03_T1w.nii.gz: no age") == 1
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "*_centiles.tsv" in ignore and "*_centiles.json" in ignore

    assert run_app(raw, out, "--norms-dir", NICHART_NORMS, models=tiny_models, level="group") == 0
    assert "dlmuse_centile_bands.png" in (out / "group" / "dlmuse_report.html").read_text()
    group = pd.read_csv(
        out / "group" / "dlmuse_centiles.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    assert len(group) == len(FILES)
    rows = group.set_index("source")
    assert rows.at[FILES[0][0], "age"] == "70.5" and rows.at[FILES[2][0], "flags"] == AGE_FLAG
    assert rows.at[FILES[3][0], "GM"] == "n/a"  # no age: no centiles, still a row
    one = pd.read_csv(centile_paths(sources["sub-01_ses-1"], out)["centiles"], sep="\t", dtype=str)
    assert rows.at[FILES[0][0], "GM"] == one[one["index"] == "601"]["centile"].iloc[0]
    assert (out / "group" / "dlmuse_centiles_icvnorm.tsv").is_file()
    if shutil.which("bids-validator-deno"):  # the centile files are listed in .bidsignore
        proc = subprocess.run(
            ["bids-validator-deno", "--format", "json", str(out)], capture_output=True, text=True
        )
        issues = json.loads(proc.stdout)["issues"]["issues"]
        assert not [i for i in issues if i["severity"] == "error"], issues[:5]


def test_without_tables_or_with_bad_demographics_the_rest_is_unchanged(
    longitudinal, tiny_models, tmp_path, capsys
):
    raw, first, _ = longitudinal
    out = tmp_path / "out"
    shutil.copytree(first, out)
    kept = {p: p.read_bytes() for p in out.rglob("*_centiles.*")}
    assert kept
    assert (
        run_app(raw, out, *FAST, models=tiny_models, env={"XDG_CACHE_HOME": str(tmp_path / "c")})
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("normative centiles skipped") == 1 and "DLMUSE_OFFLINE=1" in err
    assert {p: p.read_bytes() for p in out.rglob("*_centiles.*")} == kept
    # sub-02 segmented again without the tables: its old table (of the old volumes) goes
    again = ["--overwrite", "--participant-label", "02"]
    assert (
        run_app(
            raw, out, *FAST, *again, models=tiny_models, env={"XDG_CACHE_HOME": "/nonexistent"}
        )
        == 0
    )
    capsys.readouterr()
    assert not centile_paths(raw / FILES[2][0], out)["centiles"].exists()
    assert centile_paths(raw / FILES[0][0], out)["centiles"].exists()
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    (bad / "participants.tsv").write_text(
        "participant_id\tage\tsex\nsub-01\t70\t1\nsub-02\t71\t2\n"
    )
    fresh = tmp_path / "fresh"
    one = ["--participant-label", "02", "--norms-dir", NICHART_NORMS]  # sub-02 alone: quicker
    assert run_app(bad, fresh, *FAST, *one, models=tiny_models) == 0
    err = capsys.readouterr().err
    assert err.count("sex code(s) 1, 2 do not say which sex they are") == 1
    sub02 = centile_paths(bad / FILES[2][0], fresh)["centiles"]
    assert set(pd.read_csv(sub02, sep="\t")["reference"]) == {"CN", "CN-ICVNorm"}
    assert output_paths(bad / FILES[2][0], fresh)["volumes"].is_file()
    # a participants.tsv that is no table: one line, the images are kept as they are
    before = {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file() and "sub-" in p.name}
    (bad / "participants.tsv").write_text("this is\tnot\na participants table\n")
    assert run_app(bad, fresh, *FAST, *one, models=tiny_models) == 0
    err = capsys.readouterr().err
    assert err.count("participants.tsv: no participant_id column") == 1
    assert "1 skipped" in err
    after = {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file() and "sub-" in p.name}
    assert after == before


def test_dlmuse_run_centiles(tiny_models, tmp_path, capsys):
    from dlmuse_bids.cli import dlmuse_main
    from dlmuse_bids.runner.nifti import nifti_centile_paths
    from tests.support.bids import write_scan

    heads = [write_scan(tmp_path / "in", f"sub-{i}_T1w.nii.gz", FILES[i][1]) for i in (0, 2)]
    out = tmp_path / "out"
    run = ["run", "-o", str(out), "--model-dir", str(tiny_models), "--no-tta", "--norms-dir"]
    run.append(str(NICHART_NORMS))
    assert dlmuse_main([*run, *map(str, heads), "--age", "70"]) == 64
    assert "--age and --sex describe one scan" in capsys.readouterr().err
    assert dlmuse_main([*run, str(heads[0]), "--age", "70", "--sex", "female"]) == 0
    paths = nifti_centile_paths(out, heads[0])
    table = pd.read_csv(paths["centiles"], sep="\t", dtype=str)
    assert list(table.columns) == list(COLUMNS)
    assert set(table["reference"]) == {"CN-Females", "CN-ICVNorm"}
    assert json.loads(paths["centiles_json"].read_text())["Age"] == 70
    # NiChart's demographics CSV for several inputs; the second has no row: said, no table
    csv = tmp_path / "demog.csv"
    csv.write_text("MRID,Age,Sex\nsub-0,71,M\n")
    assert dlmuse_main([*run, *map(str, heads), "--demographics", str(csv)]) == 0
    err = capsys.readouterr().err
    assert "no age (give --age, or MRID sub-2 in --demographics)" in err
    assert set(pd.read_csv(paths["centiles"], sep="\t")["reference"]) == {"CN-Males", "CN-ICVNorm"}
    assert not nifti_centile_paths(out, heads[1])["centiles"].exists()
    # segmented again without an age: the old table (of the old volumes) goes
    assert dlmuse_main([*run, str(heads[0]), "--overwrite"]) == 0
    assert not paths["centiles"].exists() and not paths["centiles_json"].exists()
    with pytest.raises(SystemExit) as refused:  # a code that says no sex: a usage error
        dlmuse_main(["run", "-o", str(out), "--sex", "2", str(heads[0])])
    assert refused.value.code == 64
