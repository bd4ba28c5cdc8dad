"""The nipype workflow gives exactly what DLMUSEPipeline.run gives, and loads models once."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dlmuse_bids import interfaces
from dlmuse_bids.bids import figure_paths, output_paths, source_entities
from dlmuse_bids.io import load_t1w
from dlmuse_bids.models import find_model, load_trained_model
from dlmuse_bids.pipeline import STEPS, DLMUSEPipeline, step_sources
from dlmuse_bids.reports.subject import write_subject_report
from dlmuse_bids.runner import provenance
from dlmuse_bids.settings import PipelineInference
from dlmuse_bids.template import TEMPLATE, find_template, read_itk_affine
from dlmuse_bids.workflows import (
    init_dlmuse_wf,
    init_participant_wf,
    request_slurm_resources,
    workflow_name,
)
from tests.conftest import needs_shared
from tests.support.bids import write_scan
from tests.support.templates import make_templateflow_home

pytestmark = needs_shared


def _models(models_dir):
    infos = {}
    for key in ("DLICV", "DLMUSE"):
        infos[key] = load_trained_model(find_model(key, [models_dir])).info(key)
    return infos


def test_workflow_equals_the_in_memory_pipeline(tiny_models, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    sources = [
        write_scan(raw, "sub-01/anat/sub-01_T1w.nii.gz", "sub-brainchop_T1w.nii.gz"),  # LIA
        write_scan(raw, "sub-02/anat/sub-02_T1w.nii", "sub-dep01_T1w.nii.gz"),  # float32
    ]
    models = _models(tiny_models)
    inference = PipelineInference.preset(
        "default", device="cpu", use_mirroring=False, num_threads=1
    )
    prov = provenance("test", inference, models, template=TEMPLATE)
    template, why = find_template(make_templateflow_home(tmp_path / "templateflow"))
    assert template is not None, why
    out = tmp_path / "out"
    wf = init_participant_wf(
        t1w_files=sources,
        bids_dir=raw,
        output_dir=out,
        models=models,
        inference=inference,
        provenance=prov,
        template=template,
    )
    wf.base_dir = str(tmp_path / "work")
    interfaces.load_predictor.cache_clear()
    reads = []  # every opening of a source image while the workflow runs
    real_load, real_t1w = nib.load, interfaces.load_t1w
    monkeypatch.setattr(
        nib, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k)
    )
    monkeypatch.setattr(
        interfaces, "load_t1w", lambda f, **k: reads.append(str(f)) or real_t1w(f, **k)
    )
    wf.run(plugin="Linear")
    for source in sources:  # the report's figure is drawn in the workflow...
        assert figure_paths(source, out)["mosaic"].stat().st_size > 0
        write_subject_report(source_entities(source)["subject"], [source], out, raw)
    monkeypatch.undo()
    # ...so each source is read once, by the first node; the later nodes read their inputs
    assert [reads.count(str(source)) for source in sources] == [1, 1]
    # Linear runs every node in this process: each model was loaded exactly once
    info = interfaces.load_predictor.cache_info()
    assert (info.misses, info.hits) == (2, 2)

    pipeline = DLMUSEPipeline(  # the same options, network by network
        load_trained_model(models["DLICV"].folder).predictor(inference.dlicv),
        load_trained_model(models["DLMUSE"].folder).predictor(inference.dlmuse),
    )
    for source in sources:
        expected = pipeline.run(load_t1w(source))
        paths = output_paths(source, out)
        dseg, mask = nib.load(paths["dseg"]), nib.load(paths["mask"])
        src = nib.load(source)
        for img in (dseg, mask):
            assert img.shape == src.shape
            assert np.array_equal(img.affine, src.affine)
            assert img.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(dseg.dataobj), np.asarray(expected.labels.dataobj))
        assert np.array_equal(np.asarray(mask.dataobj), np.asarray(expected.icv_mask.dataobj))
        table = pd.read_csv(paths["volumes"], sep="\t", na_values="n/a")
        got = dict(zip(table["index"], table["volume_mm3"], strict=True))
        for roi, volume in expected.volumes.items():
            assert got[roi] == pytest.approx(volume, rel=1e-12)
        meta = json.loads(paths["mask_json"].read_text())
        assert meta["ICVComponentSelection"]["outcome"] == expected.selection.outcome
        assert meta["Device"] == "cpu"
        assert set(meta["InferenceSeconds"]) == {"DLICV", "DLMUSE"}
        assert meta["TemplateCheck"] == TEMPLATE
        # the template check ran: its transform is stored and its measures are in the QC row
        qc_row = pd.read_csv(paths["qc"], sep="\t", na_values="n/a").iloc[0]
        assert qc_row["template_check"] == TEMPLATE
        assert 0 <= qc_row["template_rotation_deg"] <= 180
        matrix = read_itk_affine(paths["xfm"].read_text())
        assert np.linalg.det(matrix[:3, :3]) == pytest.approx(qc_row["template_scale"], rel=1e-6)


def test_workflow_names_are_unique_and_safe(tmp_path):
    names = {
        workflow_name(tmp_path / n)
        for n in ("sub-01_run-1_T1w.nii.gz", "sub-01_run-2_T1w.nii.gz", "sub-01_T1w.nii")
    }
    assert len(names) == 3
    assert all(n.replace("_", "").isalnum() for n in names)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_slurm_jobs_ask_for_what_their_node_needs(tiny_models, tmp_path, device):
    """Heavy nodes get their threads, memory (and a GPU) as sbatch options; the user's last."""
    raw = tmp_path / "raw"
    source = write_scan(raw, "sub-01/anat/sub-01_T1w.nii.gz", "sub-otsu_T1w.nii.gz", step=1)
    models = _models(tiny_models)
    prov = provenance("test", PipelineInference(), models)
    wf = init_participant_wf(
        t1w_files=[source],
        bids_dir=tmp_path / "raw",
        output_dir=tmp_path / "out",
        models=models,
        inference=PipelineInference.preset(device=device, use_mirroring=False, num_threads=3),
        provenance=prov,
    )
    request_slurm_resources(wf, "--partition=short --mem=9G")
    image = workflow_name(source)
    args = {}
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if node.run_without_submitting or name.endswith("inputnode"):  # not submitted
            assert "sbatch_args" not in node.plugin_args, name
        else:
            assert node.plugin_args["overwrite"] is True
            args[name.removeprefix(f"{image}.")] = node.plugin_args["sbatch_args"]
    assert sorted(args) == ["dlicv", "dlmuse", "mask_crop", "paste", "reorient"]
    gpu = " --gres=gpu:1" if device == "cuda" else ""
    network_mib = int(np.ceil(wf.get_node(f"{image}.dlicv").mem_gb * 1024))
    assert network_mib > 4 * 1024  # a 1 mm whole head: the estimate, not the floor
    for name in ("dlicv", "dlmuse"):
        assert args[name] == (
            f"--cpus-per-task=3 --mem={network_mib}M{gpu} --partition=short --mem=9G"
        )
    reorient_mib = int(np.ceil(wf.get_node(f"{image}.reorient").mem_gb * 1024))
    assert args["reorient"] == (
        f"--cpus-per-task=1 --mem={reorient_mib}M --partition=short --mem=9G"
    )
    # a job never asks for less than Python with torch and nipype needs
    small = write_scan(raw, "sub-02/anat/sub-02_T1w.nii.gz", "sub-otsu_T1w.nii.gz", step=4)
    wf = init_participant_wf(
        t1w_files=[small],
        bids_dir=tmp_path / "raw",
        output_dir=tmp_path / "out",
        models=models,
        inference=PipelineInference.preset(device="cpu", use_mirroring=False, num_threads=1),
        provenance=prov,
    )
    request_slurm_resources(wf)
    node = wf.get_node(f"{workflow_name(small)}.mask_crop")
    assert node.plugin_args["sbatch_args"] == "--cpus-per-task=1 --mem=1024M"
    assert not wf.get_node(f"{workflow_name(small)}.volumes").plugin_args
    # SLURMGraph submits every node, the light ones too
    request_slurm_resources(wf, every_node=True)
    node = wf.get_node(f"{workflow_name(small)}.volumes")
    assert node.plugin_args["sbatch_args"] == "--cpus-per-task=1 --mem=1024M"


def test_the_workflow_is_wired_as_pipeline_steps_say(tiny_models, tmp_path):
    """Every step is a node, and the edges between them are exactly ``step_sources()``."""
    source = write_scan(tmp_path / "raw", "sub-01/anat/sub-01_T1w.nii.gz", "sub-otsu_T1w.nii.gz")
    models = _models(tiny_models)
    wf = init_dlmuse_wf(
        t1w=source,
        bids_dir=tmp_path / "raw",
        output_dir=tmp_path / "out",
        models=models,
        inference=PipelineInference(),
        provenance=provenance("test", PipelineInference(), models),
        name="one",
    )
    steps = {step.name for step in STEPS}
    edges = set()
    for maker, reader, data in wf._graph.edges(data=True):
        if reader.name in steps:
            for out_port, in_port in data["connect"]:
                edges.add((reader.name, in_port, maker.name, out_port))
    expected = {
        (step, port, "inputnode" if maker == "t1w" else maker, maker_port)
        for step, ports in step_sources().items()
        for port, (maker, maker_port) in ports.items()
    }
    assert edges == expected
