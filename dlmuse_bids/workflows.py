"""nipype workflow factories of the BIDS App's participant level."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .bids import FIGURES, OUTPUTS, Provenance
from .interfaces import (
    DerivativesDataSink,
    MaskAndCrop,
    NNUnetPredict,
    PasteLabels,
    QCMeasures,
    ReorientToLPS,
    ReportMosaic,
    ROIVolumes,
    SidecarMetadata,
    TemplateCheck,
)
from .io import nifti_stem
from .pipeline import SOURCE, STEPS, step_sources
from .settings import NETWORKS, ModelInfo, PipelineInference
from .template import TemplateFiles

#: Memory asked for one full-width network node per input voxel: 4.5 GiB for a 176x238x169 scan,
#: models included. The measured peak of the whole pipeline on that scan is 2.9-3.9 GiB (the
#: higher on a Xeon with AMX; benchmarks/results/); the margin covers scans whose crop or grid
#: is larger for their size.
_GIB_PER_VOXEL = 4.5 / (176 * 238 * 169)
#: Memory any submitted job needs, whatever its node does: Python with nipype and torch loaded.
_JOB_MEM_FLOOR_GB = 1.0
#: Nodes whose end means the image's outputs are all written.
SINK_NODES = ("ds_dseg", "ds_mask", "ds_volumes", "ds_qc")
#: The sink of the template check's transform (present when a template is available).
XFM_SINK = "ds_xfm"
#: The sink of the report's mosaic, the last file an image gets.
MOSAIC_SINK = "ds_mosaic"


def sink_nodes(template: bool) -> tuple[str, ...]:
    """The sinks of one image's sub-workflow: when all have ended, it has written everything."""
    return (*SINK_NODES, MOSAIC_SINK, *([XFM_SINK] if template else []))


def workflow_name(source: Path) -> str:
    """A nipype-safe, unique-per-file name for the sub-workflow of one T1w."""
    return "t1w_" + re.sub(r"[^0-9a-zA-Z]+", "_", nifti_stem(source)).strip("_") + "_wf"


def _network_mem_gb(source: Path) -> float:
    """Memory estimate for the network nodes, from the header alone.

    Any file whose header gives no 3-D size (unreadable, 2-D, not a NIfTI) gets the default:
    it fails in its first node, with a clear error, and must not stop the workflow being built.
    """
    try:
        shape = [int(n) for n in nib.load(source).shape[:3]]
    except Exception:
        return 2.0
    if len(shape) != 3:
        return 2.0
    return max(1.0, shape[0] * shape[1] * shape[2] * _GIB_PER_VOXEL)


def gpu_scheduling(device: str) -> bool:
    """Whether the network nodes should count as GPU jobs for nipype's MultiProc.

    ``auto`` counts only when nipype itself sees a GPU (it then runs one such node per GPU).
    """
    if device == "auto":
        from nipype.utils.gpu_count import gpu_count

        return gpu_count() > 0
    return device == "cuda"


def slurm_request(node: pe.Node) -> str:
    """``sbatch`` options asking for what ``node`` declares: its threads, memory and GPU."""
    mem_mib = math.ceil(max(node.mem_gb, _JOB_MEM_FLOOR_GB) * 1024)
    request = f"--cpus-per-task={node.n_procs} --mem={mem_mib}M"
    return request + " --gres=gpu:1" if node.is_gpu_node() else request


def request_slurm_resources(
    workflow: pe.Workflow, sbatch_args: str = "", every_node: bool = False
) -> None:
    """Give each node that nipype's SLURM plugins submit its own :func:`slurm_request`.

    The plugin's ``sbatch_args`` (partition, account, time...) follow the request: sbatch keeps
    the last of a repeated option, so what the user wrote wins. ``SLURM`` runs the light nodes
    in the launcher; ``SLURMGraph`` submits ``every_node``.
    """
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        if isinstance(node.interface, niu.IdentityInterface):
            continue  # dropped from the graph nipype executes
        if every_node or not node.run_without_submitting:
            request = f"{slurm_request(node)} {sbatch_args}".strip()
            node.plugin_args = {"sbatch_args": request, "overwrite": True}


def _step_nodes(
    t1w: Path, models: Mapping[str, ModelInfo], inference: PipelineInference, use_gpu: bool
) -> dict[str, pe.Node]:
    """One node per step of :data:`dlmuse_bids.pipeline.STEPS`: its interface and resources."""
    mem_gb = _network_mem_gb(t1w)
    nodes = {
        "reorient": pe.Node(ReorientToLPS(), name="reorient", mem_gb=mem_gb / 4),
        "mask_crop": pe.Node(MaskAndCrop(), name="mask_crop", mem_gb=mem_gb / 4),
        "paste": pe.Node(PasteLabels(), name="paste", mem_gb=mem_gb / 4),
        # light: run in the launching process, a scheduler job would cost more than the node
        "volumes": pe.Node(ROIVolumes(), name="volumes", run_without_submitting=True),
    }
    for key in NETWORKS:
        info = models[key]
        nodes[key.lower()] = pe.Node(
            NNUnetPredict(
                model_folder=str(info.folder),
                folds=list(info.folds),
                checkpoint_sha256=dict(info.sha256),
                options=inference.network(key).hashed(),
                num_threads=inference.num_threads or 1,
                use_gpu=use_gpu,
            ),
            name=key.lower(),
            n_procs=inference.num_threads or 1,
            mem_gb=mem_gb,
        )
    missing = {step.name for step in STEPS} ^ set(nodes)
    if missing:
        raise RuntimeError(f"pipeline steps and workflow nodes differ: {sorted(missing)}")
    return nodes


def init_dlmuse_wf(
    *,
    t1w: Path,
    bids_dir: Path,
    output_dir: Path,
    models: Mapping[str, ModelInfo],
    inference: PipelineInference,
    provenance: Provenance,
    template: TemplateFiles | None = None,
    template_note: str = "no template given",
    use_gpu: bool | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """DLICV + DLMUSE on one T1w, with its outputs written to the derivative dataset.

    Nodes: one per step of :data:`dlmuse_bids.pipeline.STEPS` (reorient -> dlicv -> mask_crop
    -> dlmuse -> paste -> volumes, wired as that list says), then qc, the metadata and four
    sinks (label map, ICV mask, volumes table, QC table). With a ``template``, the ICV-masked
    T1w is aligned to it (its measures go to the QC table, its transform to a fifth
    sink); without one, the QC table says why (``template_note``). ``use_gpu`` defaults to
    :func:`gpu_scheduling` of the device.
    """
    if use_gpu is None:
        use_gpu = gpu_scheduling(inference.device)
    workflow = pe.Workflow(name=name or workflow_name(t1w))
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(t1w)

    nodes = _step_nodes(t1w, models, inference, use_gpu)
    if provenance.t1w_volume is not None:
        nodes["reorient"].inputs.volume = provenance.t1w_volume
    for step, ports in step_sources().items():  # the pipeline, as pipeline.STEPS wires it
        for port, (maker, maker_port) in ports.items():
            source = inputnode if maker == SOURCE else nodes[maker]
            workflow.connect(source, maker_port, nodes[step], port)
    reorient, mask_crop, paste = nodes["reorient"], nodes["mask_crop"], nodes["paste"]
    networks = {"DLICV": nodes["dlicv"], "DLMUSE": nodes["dlmuse"]}
    # light nodes run in the launching process: a scheduler job each would cost more than them
    qc = pe.Node(QCMeasures(), name="qc", run_without_submitting=True)
    seconds = pe.Node(niu.Merge(2), name="seconds", run_without_submitting=True)
    sidecars = pe.Node(
        SidecarMetadata(bids_dir=str(bids_dir), provenance=asdict(provenance)),
        name="sidecars",
        run_without_submitting=True,
    )
    sinks = {}
    for node_name, key in zip(SINK_NODES, ("dseg", "mask", "volumes", "qc"), strict=True):
        sinks[key] = pe.Node(
            DerivativesDataSink(base_directory=str(output_dir), entities=OUTPUTS[key]),
            name=node_name,
            run_without_submitting=True,
        )

    # fmt: off
    workflow.connect([
        (inputnode, sidecars, [("t1w", "source_file")]),
        (networks["DLICV"], sidecars, [("device", "device")]),
        (mask_crop, sidecars, [("selection", "selection")]),
        (reorient, sidecars, [("orientation", "orientation"), ("geometry", "geometry")]),
        (inputnode, sinks["dseg"], [("t1w", "source_file")]),
        (paste, sinks["dseg"], [("out_dseg", "in_file")]),
        (sidecars, sinks["dseg"], [("dseg_meta", "metadata")]),
        (inputnode, sinks["mask"], [("t1w", "source_file")]),
        (paste, sinks["mask"], [("out_mask", "in_file")]),
        (sidecars, sinks["mask"], [("mask_meta", "metadata")]),
        (inputnode, sinks["volumes"], [("t1w", "source_file")]),
        (nodes["volumes"], sinks["volumes"], [("out_file", "in_file")]),
        (paste, qc, [("out_dseg", "in_file")]),
        (mask_crop, qc, [("selection", "selection")]),
        (reorient, qc, [("orientation", "orientation")]),
        (inputnode, sinks["qc"], [("t1w", "source_file")]),
        (qc, sinks["qc"], [("out_file", "in_file")]),
        (networks["DLICV"], seconds, [("seconds", "in1")]),
        (networks["DLMUSE"], seconds, [("seconds", "in2")]),
        (seconds, sidecars, [("out", "seconds")]),
    ])
    # fmt: on
    _add_mosaic(workflow, inputnode, reorient, sinks, output_dir)
    if template is None:
        qc.inputs.template = {"skipped": template_note}
        return workflow
    check = pe.Node(
        TemplateCheck(
            template_name=template.name,
            template_t1w=str(template.t1w),
            template_mask=str(template.mask),
        ),
        name="template_check",
        mem_gb=reorient.mem_gb,
    )
    ds_xfm = pe.Node(
        DerivativesDataSink(base_directory=str(output_dir), entities=OUTPUTS["xfm"]),
        name=XFM_SINK,
        run_without_submitting=True,
    )
    # fmt: off
    workflow.connect([
        (reorient, check, [("out_file", "in_file")]),
        (mask_crop, check, [("icv_mask", "icv_mask")]),
        (check, qc, [("measures", "template")]),
        (inputnode, ds_xfm, [("t1w", "source_file")]),
        (check, ds_xfm, [("out_xfm", "in_file")]),
    ])
    # fmt: on
    return workflow


def _add_mosaic(workflow, inputnode, reorient, sinks, output_dir: Path) -> None:
    """The report's mosaic, drawn from the stored label map and mask (so it is never older)."""
    draw = pe.Node(ReportMosaic(), name="mosaic", run_without_submitting=True)
    sink = pe.Node(
        DerivativesDataSink(base_directory=str(output_dir), entities=FIGURES["mosaic"]),
        name=MOSAIC_SINK,
        run_without_submitting=True,
    )
    # fmt: off
    workflow.connect([
        (reorient, draw, [("out_file", "t1w")]),
        (sinks["dseg"], draw, [("out_file", "dseg")]),
        (sinks["mask"], draw, [("out_file", "mask")]),
        (inputnode, sink, [("t1w", "source_file")]),
        (draw, sink, [("out_file", "in_file")]),
    ])
    # fmt: on


def init_participant_wf(
    *,
    t1w_files: Sequence[Path],
    bids_dir: Path,
    output_dir: Path,
    models: Mapping[str, ModelInfo],
    inference: PipelineInference,
    provenance: Provenance,
    template: TemplateFiles | None = None,
    template_note: str = "no template given",
    lock_writes: bool = False,
    name: str = "dlmuse_bids_wf",
) -> pe.Workflow:
    """One :func:`init_dlmuse_wf` per T1w, side by side (they share nothing).

    ``lock_writes``: each sink writes under its image's lock
    (:func:`dlmuse_bids.locks.writing`), for the plugins whose jobs outlive the launcher's.
    """
    workflow = pe.Workflow(name=name)
    use_gpu = gpu_scheduling(inference.device)
    for t1w in t1w_files:
        workflow.add_nodes(
            [
                init_dlmuse_wf(
                    t1w=t1w,
                    bids_dir=bids_dir,
                    output_dir=output_dir,
                    models=models,
                    inference=inference,
                    provenance=provenance,
                    template=template,
                    template_note=template_note,
                    use_gpu=use_gpu,
                )
            ]
        )
    if lock_writes:
        for node_name in workflow.list_node_names():
            node = workflow.get_node(node_name)
            if isinstance(node.interface, DerivativesDataSink):
                node.inputs.lock = True
    return workflow
