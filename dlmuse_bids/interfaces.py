"""nipype interfaces over the pipeline steps, the model cache, and a BIDS derivatives sink.

Each interface is a thin wrapper: load its inputs, call one function of
:mod:`dlmuse_bids.pipeline` / :mod:`dlmuse_bids.labels` / :mod:`dlmuse_bids.bids`, save its
outputs. Intermediate images are uncompressed float32/uint8 NIfTI files in the node's folder, so
what one node hands the next is bit-for-bit what :meth:`DLMUSEPipeline.run` passes in memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .atomic import write_bytes_atomic
from .bids import OUTPUTS, Provenance, derivative_path, image_sidecar, write_json_atomic
from .io import describe_image, load_t1w, make_label_image, save_nifti_atomic
from .labels import class_to_muse_lut, roi_volume_table
from .locks import writing
from .pipeline import lps_zooms, mask_and_crop, paste_labels, to_native, to_reference_orientation
from .settings import InferenceOptions

logger = logging.getLogger(__name__)


# -- the model cache ----------------------------------------------------------------------------
@lru_cache(maxsize=4)
def load_predictor(folder: str, folds: tuple, options: InferenceOptions):
    """A predictor for a model folder, loaded once per process and then reused.

    nipype's MultiProc keeps its worker processes for the whole run, so each worker loads each
    model at most once, whatever the number of images.
    """
    from .models import load_trained_model

    model = load_trained_model(Path(folder), list(folds) or None)
    logger.info(
        "loaded %s (folds %s, %s) in process %d", folder, model.folds, options.device, os.getpid()
    )
    return model.predictor(options)


def _save_like(data: np.ndarray, reference: nib.Nifti1Image, path: Path) -> str:
    img = nib.Nifti1Image(data.astype(np.float32, copy=False), reference.affine, reference.header)
    img.set_data_dtype(np.float32)
    save_nifti_atomic(img, path)
    return str(path)


def _write_tsv(frame, path: Path) -> str:
    text = frame.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    write_bytes_atomic(path, text.encode("utf-8"))
    return str(path)


def _zooms(values) -> tuple[float, float, float]:
    return tuple(float(z) for z in values)


# -- pipeline steps ---------------------------------------------------------------------------
class _ReorientInputSpec(BaseInterfaceInputSpec):
    # not exists=True: a missing file or broken link must fail in this node, with load_t1w's
    # one-line reason, not stop the whole workflow from being built
    in_file = File(mandatory=True, desc="T1w image (.nii or .nii.gz)")
    volume = traits.Int(desc="volume of a 4-D file to use (default: refuse several volumes)")


class _ReorientOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the T1w in LPS voxel order, float32")
    grid_file = File(exists=True, desc="the source's own grid and header (zeros, uint8)")
    zooms = traits.List(traits.Float, desc="voxel sizes (mm) every later step is told")
    orientation = traits.Str(desc="axis codes of the source image, e.g. RAS")
    geometry = traits.Dict(desc="which header affine was used, and why (sidecar field)")


def source_geometry(img: nib.Nifti1Image) -> dict:
    """The ``SourceGeometry`` sidecar field: which affine placed the image, and how it was read.

    Like nibabel's ``get_best_affine``, the sform is used when its code is set, else the qform;
    when both are set and disagree the sidecar says so (and that the sform won).
    """
    info = describe_image(img)
    geometry = {
        "AffineSource": info["affine_source"],
        "SformCode": info["sform_code"],
        "QformCode": info["qform_code"],
        "DataType": info["dtype"],
        "VoxelSize": info["zooms"],
    }
    extra = img.extra or {}
    if extra.get("volume") is not None:
        geometry["Volume"] = int(extra["volume"])
    if info["sform_qform_mismatch"]:
        geometry["Note"] = (
            "the sform and qform disagree; the sform was used, as nibabel's get_best_affine does"
        )
    return geometry


class ReorientToLPS(SimpleInterface):
    """Check and load a T1w (:func:`dlmuse_bids.io.load_t1w`); reorient it to LPS."""

    input_spec = _ReorientInputSpec
    output_spec = _ReorientOutputSpec

    def _run_interface(self, runtime):
        volume = self.inputs.volume if isdefined(self.inputs.volume) else None
        img = load_t1w(self.inputs.in_file, volume=volume)  # the one read of the source
        lps, _ = to_reference_orientation(img)
        data = np.asarray(lps.dataobj, dtype=np.float32)
        cwd = Path(runtime.cwd)
        self._results["out_file"] = _save_like(data, lps, cwd / "t1w_lps.nii")
        grid = make_label_image(np.zeros(img.shape, np.uint8), img)
        save_nifti_atomic(grid, cwd / "native_grid.nii")
        self._results["grid_file"] = str(cwd / "native_grid.nii")
        self._results["zooms"] = list(lps_zooms(lps))
        self._results["orientation"] = "".join(nib.aff2axcodes(img.affine))
        self._results["geometry"] = source_geometry(img)
        return runtime


class _PredictInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to segment")
    zooms = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="voxel sizes")
    model_folder = traits.Str(mandatory=True, desc="nnU-Net trained-model folder")
    folds = traits.List(desc="folds to average (empty: every fold present)")
    checkpoint_sha256 = traits.Dict(desc="checkpoint digests (so a new model re-runs)")
    options = traits.Dict(
        mandatory=True,
        desc="settings.InferenceOptions without num_threads (InferenceOptions.hashed)",
    )
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads")
    use_gpu = traits.Bool(
        False,
        usedefault=True,
        nohash=True,
        desc="may run on a GPU (nipype's MultiProc then runs one such node per GPU at a time)",
    )


class _PredictOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the model's classes on the input grid (uint8)")
    device = traits.Str(desc="where the network ran")
    seconds = traits.Float(desc="inference time")


class NNUnetPredict(SimpleInterface):
    """One nnU-Net model on one image (the model cached per process)."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        from .nnunet.predictor import PredictionInfo, resolve_device

        options = InferenceOptions(**self.inputs.options, num_threads=int(self.inputs.num_threads))
        device = resolve_device(options.device)
        predictor = load_predictor(
            self.inputs.model_folder,
            tuple(self.inputs.folds) if isdefined(self.inputs.folds) else (),
            replace(options, device=device),
        )
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        info = PredictionInfo()
        classes = predictor.predict(data, _zooms(self.inputs.zooms), info)
        out = Path(runtime.cwd) / "classes.nii"
        save_nifti_atomic(make_label_image(classes, img), out)
        self._results.update(
            out_file=str(out), device=device, seconds=float(sum(info.seconds.values()))
        )
        return runtime


class _MaskCropInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w in LPS order")
    raw_mask = File(exists=True, mandatory=True, desc="DLICV's prediction")
    zooms = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="voxel sizes")


class _MaskCropOutputSpec(TraitedSpec):
    icv_mask = File(exists=True, desc="kept ICV component (LPS grid, uint8)")
    crop_file = File(exists=True, desc="masked T1w cropped around the ICV (DLMUSE's input)")
    crop_box = traits.List(traits.List(traits.Int), desc="half-open crop box, LPS voxels")
    selection = traits.Dict(desc="how the ICV component was chosen")


class MaskAndCrop(SimpleInterface):
    """Keep the ICV component, zero the T1w outside it and crop around it."""

    input_spec = _MaskCropInputSpec
    output_spec = _MaskCropOutputSpec

    def _run_interface(self, runtime):
        from dataclasses import asdict

        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        raw = np.asarray(nib.load(self.inputs.raw_mask).dataobj)
        mask, selection, box, masked = mask_and_crop(data, raw, _zooms(self.inputs.zooms))
        cwd = Path(runtime.cwd)
        save_nifti_atomic(make_label_image(mask, img), cwd / "icv_mask_lps.nii")
        crop_img = img.slicer[tuple(slice(a, b) for a, b in box)]
        self._results["crop_file"] = _save_like(masked, crop_img, cwd / "t1w_crop.nii")
        self._results["icv_mask"] = str(cwd / "icv_mask_lps.nii")
        self._results["crop_box"] = [[int(a), int(b)] for a, b in box]
        self._results["selection"] = asdict(selection)
        return runtime


class _PasteInputSpec(BaseInterfaceInputSpec):
    grid_file = File(exists=True, mandatory=True, desc="the source's grid (ReorientToLPS)")
    crop_labels = File(exists=True, mandatory=True, desc="DLMUSE's classes on the crop")
    icv_mask = File(exists=True, mandatory=True, desc="kept ICV component (LPS)")
    crop_box = traits.List(traits.List(traits.Int), mandatory=True, desc="crop box")


class _PasteOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="MUSE label map on the T1w grid")
    out_mask = File(exists=True, desc="ICV mask on the T1w grid")


class PasteLabels(SimpleInterface):
    """MUSE ids, paste into the full grid, label 1 for unlabelled ICV, back to native order."""

    input_spec = _PasteInputSpec
    output_spec = _PasteOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.grid_file)
        classes = np.asarray(nib.load(self.inputs.crop_labels).dataobj)
        mask = np.asarray(nib.load(self.inputs.icv_mask).dataobj)
        box = tuple((a, b) for a, b in self.inputs.crop_box)
        labels = paste_labels(classes, mask, box, class_to_muse_lut())
        label_img, mask_img = to_native(labels, mask, img)
        cwd = Path(runtime.cwd)
        save_nifti_atomic(label_img, cwd / "dseg.nii.gz")
        save_nifti_atomic(mask_img, cwd / "mask.nii.gz")
        self._results.update(out_dseg=str(cwd / "dseg.nii.gz"), out_mask=str(cwd / "mask.nii.gz"))
        return runtime


class _VolumesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="MUSE label map")


class _VolumesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="TSV: index, name, volume_mm3, n_voxels")


class ROIVolumes(SimpleInterface):
    """Volume of every single and derived ROI (:func:`dlmuse_bids.labels.roi_volume_table`)."""

    input_spec = _VolumesInputSpec
    output_spec = _VolumesOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        table = roi_volume_table(np.asanyarray(img.dataobj), img.header.get_zooms()[:3])
        self._results["out_file"] = _write_tsv(table, Path(runtime.cwd) / "volumes.tsv")
        return runtime


class _TemplateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w (any voxel order)")
    icv_mask = File(exists=True, mandatory=True, desc="ICV mask on the T1w's grid")
    template_name = traits.Str(mandatory=True, desc="TemplateFlow name of the template")
    template_t1w = File(exists=True, mandatory=True, desc="the template's T1w")
    template_mask = File(exists=True, mandatory=True, desc="the template's brain mask")


class _TemplateOutputSpec(TraitedSpec):
    out_xfm = File(desc="ITK affine, template -> T1w points (resamples T1w); none if skipped")
    measures = traits.Dict(desc="rotation, scale, NCC, eTIV (dlmuse_bids.qc.template_measures)")


class TemplateCheck(SimpleInterface):
    """Align the ICV-masked T1w to the template (:mod:`dlmuse_bids.template`)."""

    input_spec = _TemplateInputSpec
    output_spec = _TemplateOutputSpec

    def _run_interface(self, runtime):
        from .qc import template_measures
        from .template import itk_affine_text, register_to_template

        try:
            fit = register_to_template(
                nib.load(self.inputs.in_file),
                nib.load(self.inputs.icv_mask),
                nib.load(self.inputs.template_t1w),
                nib.load(self.inputs.template_mask),
            )
        except ValueError as exc:  # an empty mask: QC says why, nothing to store
            self._results["measures"] = {"skipped": str(exc)}
            return runtime
        out = Path(runtime.cwd) / "xfm.txt"
        write_bytes_atomic(out, itk_affine_text(fit.matrix).encode("ascii"))
        self._results["out_xfm"] = str(out)
        self._results["measures"] = template_measures(
            self.inputs.template_name, fit.rotation_deg, fit.scale, fit.ncc, fit.etiv_l
        )
        return runtime


class _QCInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="MUSE label map")
    selection = traits.Dict(mandatory=True, desc="how the ICV component was chosen")
    orientation = traits.Str(mandatory=True, desc="source axis codes")
    template = traits.Dict(desc="template check measures, or {'skipped': reason}")


class _QCOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="TSV: one row of QC measures and flags")


class QCMeasures(SimpleInterface):
    """Automatic QC measures and flags (:func:`dlmuse_bids.qc.qc_row`)."""

    input_spec = _QCInputSpec
    output_spec = _QCOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from .qc import qc_row

        img = nib.load(self.inputs.in_file)
        row = qc_row(
            np.asanyarray(img.dataobj),
            tuple(float(z) for z in img.header.get_zooms()[:3]),
            component_outcome=self.inputs.selection.get("outcome"),
            orientation=self.inputs.orientation,
            template=self.inputs.template if isdefined(self.inputs.template) else None,
        )
        self._results["out_file"] = _write_tsv(pd.DataFrame([row]), Path(runtime.cwd) / "qc.tsv")
        return runtime


class _MosaicInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="the segmented T1w (ReorientToLPS's out_file)")
    dseg = File(exists=True, mandatory=True, desc="the stored MUSE label map")
    mask = File(exists=True, mandatory=True, desc="the stored ICV mask")


class _MosaicOutputSpec(TraitedSpec):
    out_file = File(desc="PNG mosaic (undefined if it could not be drawn)")


class ReportMosaic(SimpleInterface):
    """The subject report's mosaic (:func:`dlmuse_bids.reports.figures.mosaic`).

    Drawn from the T1w the first node read, so the report never reads the source again. A
    figure that cannot be drawn is logged, not a failure of the image: the report then draws
    it or says why.
    """

    input_spec = _MosaicInputSpec
    output_spec = _MosaicOutputSpec

    def _run_interface(self, runtime):
        from .reports.figures import mosaic

        out = Path(runtime.cwd) / "mosaic.png"
        try:
            mosaic(
                *(nib.load(f) for f in (self.inputs.t1w, self.inputs.dseg, self.inputs.mask)), out
            )
        except Exception as exc:  # noqa: BLE001 - the segmentation is stored; the figure is extra
            logger.warning(
                "mosaic of %s not drawn: %s: %s", self.inputs.dseg, type(exc).__name__, exc
            )
        else:
            self._results["out_file"] = str(out)
        return runtime


# -- metadata and outputs -----------------------------------------------------------------------
class _SidecarInputSpec(BaseInterfaceInputSpec):
    source_file = File(mandatory=True, desc="the raw T1w")
    bids_dir = traits.Str(mandatory=True, desc="root of the raw dataset")
    provenance = traits.Dict(mandatory=True, desc="Provenance fields (software, models, TTA)")
    device = traits.Str(mandatory=True, desc="where the networks ran")
    selection = traits.Dict(mandatory=True, desc="how the ICV component was chosen")
    orientation = traits.Str(mandatory=True, desc="source axis codes")
    geometry = traits.Dict(desc="SourceGeometry: the affine used, data type, voxel size")
    seconds = traits.List(traits.Float, desc="DLICV and DLMUSE inference times")


class _SidecarOutputSpec(TraitedSpec):
    dseg_meta = traits.Dict(desc="sidecar of the label map")
    mask_meta = traits.Dict(desc="sidecar of the ICV mask")


class SidecarMetadata(SimpleInterface):
    """JSON sidecars of the label map and the mask (sources, provenance, what was decided)."""

    input_spec = _SidecarInputSpec
    output_spec = _SidecarOutputSpec

    def _run_interface(self, runtime):
        source, bids_dir = Path(self.inputs.source_file), Path(self.inputs.bids_dir)
        prov = Provenance(**self.inputs.provenance)
        common = {"Device": self.inputs.device, "SourceOrientation": self.inputs.orientation}
        if isdefined(self.inputs.geometry):
            common["SourceGeometry"] = dict(self.inputs.geometry)
        if isdefined(self.inputs.seconds):
            common["InferenceSeconds"] = dict(
                zip(("DLICV", "DLMUSE"), (round(t, 2) for t in self.inputs.seconds), strict=True)
            )
        selection = dict(self.inputs.selection)
        self._results["dseg_meta"] = image_sidecar(
            source,
            bids_dir,
            prov,
            Description="DLMUSE segmentation into MUSE regions (see seg-DLMUSE_dseg.tsv); "
            "label 1: intracranial voxels outside every region",
            **common,
        )
        self._results["mask_meta"] = image_sidecar(
            source,
            bids_dir,
            prov,
            Type="ROI",
            Description="intracranial volume (ICV) mask from DLICV",
            ICVComponentSelection=selection,
            **common,
        )
        return runtime


class _SinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Str(mandatory=True, desc="root of the derivative dataset")
    source_file = File(mandatory=True, desc="the raw T1w whose entities name the output")
    in_file = File(exists=True, desc="file to store (nothing is stored when it is undefined)")
    entities = traits.Dict(mandatory=True, desc="entities replacing the source's suffix etc.")
    metadata = traits.Dict(desc="JSON sidecar content (written after the file)")
    lock = traits.Bool(
        False,
        usedefault=True,
        desc="write under the image's lock (jobs of a graph plugin, whose launcher has gone)",
    )


class _SinkOutputSpec(TraitedSpec):
    out_file = File(desc="where the file went")
    out_meta = File(desc="where its sidecar went")


class DerivativesDataSink(SimpleInterface):
    """Store a file under its pybids-built derivative name, atomically, with its sidecar."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        source = Path(self.inputs.source_file)
        base = Path(self.inputs.base_directory)
        entities = dict(self.inputs.entities)
        if not isdefined(self.inputs.in_file):
            return runtime
        if not self.inputs.lock:
            self._store(source, base, entities)
            return runtime
        with writing(base, derivative_path(source, **OUTPUTS["dseg"]).name, logger.warning):
            self._store(source, base, entities)
        return runtime

    def _store(self, source: Path, base: Path, entities: dict) -> None:
        out = base / derivative_path(source, **entities)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, Path(self.inputs.in_file).read_bytes())
        self._results["out_file"] = str(out)
        if isdefined(self.inputs.metadata) and self.inputs.metadata:
            meta = base / derivative_path(source, **{**entities, "extension": ".json"})
            write_json_atomic(meta, self.inputs.metadata)
            self._results["out_meta"] = str(meta)
