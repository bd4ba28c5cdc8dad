"""The DLMUSE pipeline for one T1w image, with NiChart_DLMUSE's semantics.

1. reorient to LPS by axis flips/permutations (no resampling);
2. DLICV -> intracranial mask, keeping the component NiChart's DLICV keeps;
3. zero the image outside the mask and crop it around the mask's largest 6-connected component;
4. DLMUSE on the crop, classes mapped to MUSE ids;
5. paste back; ICV voxels with no region become label 1;
6. back to the input's own voxel order, grid and header;
7. volumes of every single and derived ROI.

Where NiChart_DLMUSE 1.0.10 has a bug we do the right thing and say so here:

* its crop drops the last slice of the padded box (``img[b_min:b_max]`` with an inclusive
  ``b_max``); we keep it, so a crop is symmetric and never cuts the mask when the padding
  rounds to zero;
* it writes the cropped image with the uncropped affine; our crop carries a shifted affine;
* it masks in float64 and saves with the input's integer data type, so nibabel rescales the
  intensities (a uint8 scan whose brain peaks at 183 is re-quantised in steps of 183/255) and
  DLMUSE sees values up to half a step off; we pass DLMUSE the scan's own values.

The first two never change a label (nnU-Net crops its input to the non-zero voxels anyway); the
third does wherever the network is sensitive to small intensity changes. On float images the two
pipelines see the same input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from .io import make_label_image
from .labels import (
    ICV_ID,
    RESIDUAL_ICV_LABEL,
    class_to_muse_lut,
    roi_volumes,
)
from .nnunet.predictor import PredictionInfo, Predictor

logger = logging.getLogger(__name__)

#: Components of the DLICV mask smaller than this (voxels) are never the ICV (as DLICV 1.0.6).
MIN_ICV_COMPONENT_VOXELS = 200_000
#: Crop padding around the ICV mask, as a fraction of the mask's extent on each axis.
CROP_PAD_FRACTION = 0.10
REFERENCE_ORIENTATION = "LPS"

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


@dataclass
class ComponentSelection:
    """How the ICV component was chosen from the raw DLICV mask (DLICV 1.0.6's rule)."""

    # "single", "largest-roundest", "no-large-component", "no-component-within-3sd", "empty"
    outcome: str
    n_components: int
    large_sizes: list[int]
    large_roundness: list[float]
    kept_voxels: int


@dataclass
class PipelineResult:
    """Everything the pipeline produced for one image."""

    labels: nib.Nifti1Image  # MUSE ids, input grid, uint8
    icv_mask: nib.Nifti1Image  # 0/1, input grid, uint8
    single_volumes: dict[int, float]
    volumes: dict[int, float]  # every ROI of the volumes table, in its order
    selection: ComponentSelection
    source_orientation: str
    seconds: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, PredictionInfo] = field(default_factory=dict)


# -- geometry -------------------------------------------------------------------------------
def to_reference_orientation(
    img: nib.Nifti1Image, codes: str = REFERENCE_ORIENTATION
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Reorient ``img`` to ``codes`` by flips/permutations; return it and its source orientation.

    Returns the reoriented image and the source orientation (nibabel ``ornt`` array).
    """
    source = io_orientation(img.affine)
    return img.as_reoriented(ornt_transform(source, axcodes2ornt(codes))), source


def from_reference_orientation(
    data: np.ndarray, source: np.ndarray, codes: str = REFERENCE_ORIENTATION
) -> np.ndarray:
    """Put a voxel array in ``codes`` orientation back into the source orientation."""
    back = ornt_transform(axcodes2ornt(codes), source)
    return np.ascontiguousarray(apply_orientation(data, back))


def crop_box(
    mask: np.ndarray, pad_fraction: float = CROP_PAD_FRACTION
) -> tuple[tuple[int, int], ...]:
    """Half-open box around the mask's largest 6-connected component, padded and clipped.

    The padding on each side is ``round(pad_fraction * (last - first))`` voxels (NiChart's rule,
    numpy rounding), clipped to the image.
    """
    labelled, n = ndimage.label(mask, _SIX_CONNECTED)
    if n == 0:
        raise ValueError("the intracranial mask is empty")
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    largest = labelled == int(np.argmax(sizes))
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(largest, axis=other))
        first, last = int(hits[0]), int(hits[-1])
        pad = int(np.round((last - first) * pad_fraction))
        box.append((max(0, first - pad), min(mask.shape[axis], last + pad + 1)))
    return tuple(box)


# -- DLICV component selection ----------------------------------------------------------------
# Crofton weights of ITK's 3-D perimeter estimate: Voronoi areas on the unit sphere of the 13
# lattice directions (axes, face diagonals, body diagonals). ITK uses them for any spacing.
_CROFTON = {1: 0.04577789120476 * 2, 2: 0.03698062787608 * 2, 3: 0.03519563978232 * 2}


def itk_roundness(component: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Roundness of a binary object as SimpleITK's ``LabelShapeStatisticsImageFilter`` gives it.

    Roundness is the surface of the sphere of equal volume over the object's surface, the
    surface being ITK's intercept-count (Crofton) estimate along the 13 lattice directions.
    ``component`` axes must be in ITK index order (NIfTI voxel order).
    """
    obj = np.pad(component.astype(bool), 1)
    spacing_arr = np.asarray(spacing, dtype=float)
    vol = float(np.prod(spacing_arr))
    surface = 0.0
    for d in np.ndindex(3, 3, 3):
        off = np.array(d) - 1
        if not off.any() or tuple(off[off != 0][:1]) != (1,):
            continue  # one of each +/- pair: the first non-zero component is +1
        shifted = obj[tuple(slice(max(o, 0), obj.shape[i] + min(o, 0)) for i, o in enumerate(off))]
        base = obj[tuple(slice(max(-o, 0), obj.shape[i] + min(-o, 0)) for i, o in enumerate(off))]
        crossings = int(np.count_nonzero(base ^ shifted))
        # crossings counts both directions along this line family, i.e. ITK's two intercepts
        length = float(np.sqrt(np.sum((off * spacing_arr) ** 2)))
        surface += vol / length * crossings / 2.0 * _CROFTON[int(np.abs(off).sum())]
    surface *= 4
    volume = float(np.count_nonzero(component)) * vol
    radius = (3 * volume / (4 * np.pi)) ** (1 / 3)
    return float(4 * np.pi * radius**2 / surface) if surface > 0 else 0.0


def select_icv_component(
    mask: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, ComponentSelection]:
    """Keep the intracranial component of a raw DLICV mask, as DLICV 1.0.6 does.

    Components (6-connected) over :data:`MIN_ICV_COMPONENT_VOXELS` are candidates. One: keep it.
    Several: keep those within 3 SD of the mean candidate size, then of the two largest the one
    with the higher ITK roundness. None: keep the mask as it is.
    """
    labelled, n = ndimage.label(mask > 0, _SIX_CONNECTED)
    if n == 0:
        return mask.astype(np.uint8), ComponentSelection("empty", 0, [], [], 0)
    sizes = np.bincount(labelled.ravel())
    large = [(int(sizes[i]), i) for i in range(1, n + 1) if sizes[i] > MIN_ICV_COMPONENT_VOXELS]
    if not large:
        kept = mask.astype(np.uint8)
        return kept, ComponentSelection("no-large-component", n, [], [], int(kept.sum()))
    if len(large) == 1:
        size, lab = large[0]
        return (
            (labelled == lab).astype(np.uint8),
            ComponentSelection("single", n, [size], [], size),
        )
    # stable sorts, as Python's, so equal sizes keep label order
    large.sort(key=lambda t: t[0], reverse=True)
    values = np.array([s for s, _ in large], dtype=float)
    mean, sd = values.mean(), values.std()
    kept_list = [t for t in large if mean - 3 * sd < t[0] < mean + 3 * sd][:2]
    if not kept_list:  # all candidates the same size: DLICV's rule keeps the raw mask
        kept = mask.astype(np.uint8)
        return kept, ComponentSelection(
            "no-component-within-3sd", n, [s for s, _ in large], [], int(kept.sum())
        )
    boxes = ndimage.find_objects(labelled)
    roundness = {
        lab: itk_roundness(labelled[boxes[lab - 1]] == lab, spacing) for _, lab in kept_list
    }
    kept_list.sort(key=lambda t: roundness[t[1]], reverse=True)
    size, lab = kept_list[0]
    return (
        (labelled == lab).astype(np.uint8),
        ComponentSelection(
            "largest-roundest",
            n,
            [s for s, _ in large],
            [roundness.get(lb, float("nan")) for _, lb in large],
            size,
        ),
    )


# -- pipeline steps (each also a node of the BIDS App's workflow) ------------------------------
def mask_and_crop(
    data: np.ndarray, raw_mask: np.ndarray, zooms: tuple[float, float, float]
) -> tuple[np.ndarray, ComponentSelection, tuple[tuple[int, int], ...], np.ndarray]:
    """Keep the ICV component of a raw DLICV mask, then mask and crop the image around it.

    Parameters
    ----------
    data
        The image in LPS voxel order (float32).
    raw_mask
        DLICV's prediction on ``data`` (0/1).
    zooms
        Voxel sizes (mm) of ``data``.

    Returns
    -------
    mask, selection, box, masked
        The kept mask (uint8, ``data``'s grid), how it was chosen, the half-open crop box, and
        the cropped image with zeros outside the mask (float32), DLMUSE's input.
    """
    mask, selection = select_icv_component(raw_mask, zooms)
    if not mask.any():
        raise ValueError("DLICV found no intracranial voxels")
    box = crop_box(mask)
    crop = tuple(slice(a, b) for a, b in box)
    masked = np.where(mask[crop] > 0, data[crop], np.float32(0)).astype(np.float32, copy=False)
    return mask, selection, box, masked


def paste_labels(
    classes: np.ndarray, mask: np.ndarray, box: tuple[tuple[int, int], ...], lut: np.ndarray
) -> np.ndarray:
    """MUSE label map on the full LPS grid from DLMUSE's classes on the crop.

    Classes become MUSE ids through ``lut``; intracranial voxels with no region become
    :data:`RESIDUAL_ICV_LABEL`.
    """
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[tuple(slice(a, b) for a, b in box)] = lut[classes]
    labels[(labels == 0) & (mask > 0)] = RESIDUAL_ICV_LABEL
    return labels


def to_native(
    labels: np.ndarray, mask: np.ndarray, img: nib.Nifti1Image
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """LPS-ordered label map and mask as uint8 images on ``img``'s own grid and header."""
    source = io_orientation(img.affine)
    return (
        make_label_image(from_reference_orientation(labels, source), img),
        make_label_image(from_reference_orientation(mask, source), img),
    )


def lps_zooms(lps: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel sizes the networks are told (every step must use the very same floats)."""
    return tuple(float(z) for z in lps.header.get_zooms()[:3])


def check_models(dlicv_classes: int, dlmuse_classes: int) -> None:
    """Refuse a model pair that cannot be DLICV (2 classes) and DLMUSE (152 classes)."""
    if dlicv_classes != 2:
        raise ValueError(f"the DLICV model must have 2 classes, not {dlicv_classes}")
    n_muse = len(class_to_muse_lut())
    if dlmuse_classes != n_muse:
        raise ValueError(f"the DLMUSE model must have {n_muse} classes, not {dlmuse_classes}")


# -- the pipeline -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One pipeline step: the values it reads and makes, each on a named port.

    Ports are the argument and result names of the step: the keyword arguments and result keys
    of ``DLMUSEPipeline._<name>`` and the input and output traits of the step's nipype node. A
    value is an image in memory or the file holding it, depending on who runs the step.
    """

    name: str
    reads: dict[str, str]  # port -> value
    makes: dict[str, str]  # port -> value


#: The source value: the validated T1w image (in memory) or its file (in the workflow).
SOURCE = "t1w"
#: The steps in the order they run; :meth:`DLMUSEPipeline.run` and
#: :func:`dlmuse_bids.workflows.init_dlmuse_wf` both read this list, so they cannot differ.
STEPS = (
    Step(
        "reorient",
        reads={"in_file": SOURCE},
        makes={"out_file": "lps", "grid_file": "grid", "zooms": "zooms"},
    ),
    Step("dlicv", reads={"in_file": "lps", "zooms": "zooms"}, makes={"out_file": "raw_mask"}),
    Step(
        "mask_crop",
        reads={"in_file": "lps", "raw_mask": "raw_mask", "zooms": "zooms"},
        makes={
            "icv_mask": "icv_mask",
            "crop_file": "crop",
            "crop_box": "crop_box",
            "selection": "selection",
        },
    ),
    Step("dlmuse", reads={"in_file": "crop", "zooms": "zooms"}, makes={"out_file": "classes"}),
    Step(
        "paste",
        reads={
            "grid_file": "grid",
            "crop_labels": "classes",
            "icv_mask": "icv_mask",
            "crop_box": "crop_box",
        },
        makes={"out_dseg": "dseg", "out_mask": "mask"},
    ),
    Step("volumes", reads={"in_file": "dseg"}, makes={"out_file": "volumes"}),
)


def step_sources() -> dict[str, dict[str, tuple[str, str]]]:
    """For each step, each input port's maker: ``(step, port)``, or ``(SOURCE, SOURCE)``.

    Raises ``ValueError`` if a step reads a value no earlier step makes.
    """
    made: dict[str, tuple[str, str]] = {SOURCE: (SOURCE, SOURCE)}
    wiring = {}
    for step in STEPS:
        missing = sorted(set(step.reads.values()) - set(made))
        if missing:
            raise ValueError(f"step {step.name} reads {missing}, which no earlier step makes")
        wiring[step.name] = {port: made[value] for port, value in step.reads.items()}
        made.update({value: (step.name, port) for port, value in step.makes.items()})
    return wiring


class DLMUSEPipeline:
    """DLICV then DLMUSE on one T1w image, in memory; the models are loaded once and reused.

    :meth:`run` calls one method per :data:`STEPS` entry with the values that step reads, by
    port name; each returns its values by port name (plus extras the result reports).
    """

    def __init__(self, dlicv: Predictor, dlmuse: Predictor) -> None:
        check_models(dlicv.config.num_classes, dlmuse.config.num_classes)
        self.dlicv = dlicv
        self.dlmuse = dlmuse
        self.lut = class_to_muse_lut()

    # one method per step: in-memory twins of the nodes in dlmuse_bids.interfaces
    def _reorient(self, in_file: nib.Nifti1Image) -> dict:
        lps, _ = to_reference_orientation(in_file)
        return {
            "out_file": np.asarray(lps.dataobj, dtype=np.float32),
            "grid_file": in_file,
            "zooms": lps_zooms(lps),
        }

    @staticmethod
    def _network(predictor: Predictor, in_file: np.ndarray, zooms) -> dict:
        info = PredictionInfo()
        return {"out_file": predictor.predict(in_file, zooms, info), "info": info}

    def _dlicv(self, in_file: np.ndarray, zooms) -> dict:
        return self._network(self.dlicv, in_file, zooms)

    def _dlmuse(self, in_file: np.ndarray, zooms) -> dict:
        return self._network(self.dlmuse, in_file, zooms)

    @staticmethod
    def _mask_crop(in_file: np.ndarray, raw_mask: np.ndarray, zooms) -> dict:
        mask, selection, box, masked = mask_and_crop(in_file, raw_mask, zooms)
        return {"icv_mask": mask, "crop_file": masked, "crop_box": box, "selection": selection}

    def _paste(self, grid_file, crop_labels, icv_mask, crop_box) -> dict:
        labels = paste_labels(crop_labels, icv_mask, crop_box, self.lut)
        label_img, mask_img = to_native(labels, icv_mask, grid_file)
        return {"out_dseg": label_img, "out_mask": mask_img}

    @staticmethod
    def _volumes(in_file: nib.Nifti1Image) -> dict:
        single, volumes = roi_volumes(
            np.asanyarray(in_file.dataobj), in_file.header.get_zooms()[:3]
        )
        return {"out_file": volumes, "single": single}

    def run(self, img: nib.Nifti1Image) -> PipelineResult:
        """Segment one validated 3-D T1w image (see :func:`dlmuse_bids.io.load_t1w`)."""
        values: dict[str, object] = {SOURCE: img}
        seconds: dict[str, float] = {}
        for step in STEPS:
            start = time.perf_counter()
            made = getattr(self, f"_{step.name}")(
                **{port: values[value] for port, value in step.reads.items()}
            )
            # values no later step reads (e.g. a network's PredictionInfo) are kept as step.port
            values.update(
                {step.makes.get(port, f"{step.name}.{port}"): v for port, v in made.items()}
            )
            seconds[step.name] = time.perf_counter() - start
        source_orientation = "".join(nib.aff2axcodes(img.affine))
        selection, volumes = values["selection"], values["volumes"]
        logger.info(
            "segmented %s image %s: ICV %.0f mL, component rule %s",
            source_orientation,
            img.shape,
            volumes.get(ICV_ID, 0.0) / 1000,
            selection.outcome,
        )
        return PipelineResult(
            labels=values["dseg"],
            icv_mask=values["mask"],
            single_volumes=values["volumes.single"],
            volumes=volumes,
            selection=selection,
            source_orientation=source_orientation,
            seconds=seconds,
            predictions={"DLICV": values["dlicv.info"], "DLMUSE": values["dlmuse.info"]},
        )
