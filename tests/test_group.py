"""dlmuse_bids.group: tables built from participant outputs only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dlmuse_bids import group
from dlmuse_bids.bids import Provenance, crash_log_name, output_paths, write_json_atomic
from dlmuse_bids.labels import ICV_ID, roi_volume_table, single_roi_ids


def _fake_outputs(source, out, seed):
    """Volumes and sidecar of one image, from a random label map (no segmentation)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, *single_roi_ids()], size=(20, 20, 20))
    paths = output_paths(source, out)
    paths["volumes"].parent.mkdir(parents=True, exist_ok=True)
    table = roi_volume_table(labels, (1.0, 1.0, 1.5))
    table.to_csv(paths["volumes"], sep="\t", index=False, na_rep="n/a")
    write_json_atomic(paths["dseg_json"], Provenance("0.1", {}, {}).metadata())
    return table


@pytest.fixture
def study(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    sources = [
        raw / "sub-01/ses-a/anat/sub-01_ses-a_run-01_T1w.nii.gz",
        raw / "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz",
        raw / "sub-02/anat/sub-02_acq-x_T1w.nii",
        raw / "sub-03/anat/sub-03_T1w.nii.gz",
    ]
    tables = [_fake_outputs(s, out, i) for i, s in enumerate(sources[:2])]
    (out / "logs").mkdir()
    (out / "logs" / crash_log_name(sources[2], "reorient", "20260101-000000")).write_text("x")
    raw.mkdir(exist_ok=True)
    rows = ["participant_id\tage\tsex", "sub-01\t71\tF", "sub-02\t65\tM"]
    (raw / "participants.tsv").write_text("\n".join(rows) + "\n")
    return raw, out, sources, tables


def test_one_row_per_t1w_with_status(study):
    raw, out, sources, tables = study
    frame = group.write_group_tables(sources, raw, out)
    assert frame["status"].tolist() == ["ok", "ok", "failed", "missing"]
    assert frame["session_id"].tolist()[:2] == ["ses-a", "ses-b"]
    assert frame.loc[0, "run"] == "01" and frame.loc[2, "acq"] == "x"
    assert frame["age"].tolist()[:3] == ["71", "71", "65"]
    assert pd.isna(frame.loc[3, "age"])
    volumes = dict(zip(tables[0]["index"], tables[0]["volume_mm3"], strict=True))
    columns = group.roi_columns()
    for roi, name in columns.items():
        assert frame.loc[0, name] == pytest.approx(volumes[roi])
    assert frame.loc[2, columns[ICV_ID]] != frame.loc[2, columns[ICV_ID]]  # NaN for failed
    written = pd.read_csv(out / "group" / "dlmuse_volumes.tsv", sep="\t", na_values="n/a")
    assert len(written) == 4 and (written.columns == frame.columns).all()


def test_images_a_participant_run_holds_are_missing_until_it_lets_go(study):
    """In flight: old files (ok) or an old crash (failed) are not this run's; a later group run
    picks the image up."""
    from dlmuse_bids.locks import ImageLocks

    raw, out, sources, _ = study
    running = ImageLocks(out, print)
    for source in sources[1:3]:  # one with complete old outputs, one with an old crash file
        assert running.take(output_paths(source, out)["dseg"].name) is None
    with running:
        frame = group.write_group_tables(sources, raw, out)
        assert frame["status"].tolist() == ["ok", "missing", "missing", "missing"]
        assert (
            frame.loc[1, group.roi_columns()[ICV_ID]] != frame.loc[1, group.roi_columns()[ICV_ID]]
        )
    frame = group.write_group_tables(sources, raw, out)
    assert frame["status"].tolist() == ["ok", "ok", "failed", "missing"]


def test_icv_normalised_and_summary(study):
    raw, out, sources, tables = study
    frame = group.write_group_tables(sources, raw, out)
    norm = pd.read_csv(out / "group" / "dlmuse_volumes_icvnorm.tsv", sep="\t", na_values="n/a")
    icv_col = group.roi_columns()[ICV_ID]
    assert norm[icv_col].tolist()[:2] == [1.0, 1.0]
    assert norm.loc[0, "GM"] == pytest.approx(frame.loc[0, "GM"] / frame.loc[0, icv_col])
    summary = pd.read_csv(out / "group" / "dlmuse_volumes_summary.tsv", sep="\t")
    gm = summary.set_index("roi").loc["GM"]
    values = frame.loc[frame["status"] == "ok", "GM"].astype(float)
    assert gm["n"] == 2
    assert gm["mean"] == pytest.approx(values.mean())
    assert gm["sd"] == pytest.approx(values.std(ddof=1))
    assert gm["iqr"] == pytest.approx(values.quantile(0.75) - values.quantile(0.25))
    nichart = pd.read_csv(out / "group" / "DLMUSE_Volumes.csv")
    assert nichart["MRID"].tolist() == ["sub-01_ses-a_run-01", "sub-01_ses-b"]


def test_without_participants_tsv(study):
    raw, out, sources, _ = study
    (raw / "participants.tsv").unlink()
    frame = group.write_group_tables(sources, raw, out)
    assert "age" not in frame.columns and len(frame) == 4
