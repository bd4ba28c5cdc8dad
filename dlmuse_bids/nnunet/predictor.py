"""Predict a label map for one image with an nnU-Net v2 model, with nnU-Net's semantics.

The predictor works on NIfTI-ordered voxel arrays (as nibabel returns them) and converts to the
axis convention of the reader the plans name (SimpleITK reverses the axes), so that patch sizes,
spacings and ``transpose_forward`` mean what they meant at training time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..settings import PRECISIONS, InferenceOptions
from .memory import one_arena, release_freed_memory
from .network import build_network
from .plans import ModelConfig
from .preprocessing import (
    bbox_slices,
    compute_new_shape,
    nonzero_bbox,
    resample_data,
    resampled_channels,
    streaming_argmax,
    zscore,
)
from .sliding_window import sliding_window_logits, tile_slicers, torch_threads

logger = logging.getLogger(__name__)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; others unchanged."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


#: Most classes resampled at once on export: each holds about 80 MB of float64 (a 0.88 mm head),
#: so a 16-thread GPU node would otherwise add 1.3 GB to the export's memory.
RESAMPLE_WORKERS = 4


def resolve_threads_per_pass(threads_per_pass: int | None, device_type: str) -> int | None:
    """``threads_per_pass`` where it applies: passes run several at a time only on a CPU (for
    oneDNN's thread-split sums); elsewhere None."""
    return threads_per_pass if device_type == "cpu" else None


def resolve_precision(precision: str, device_type: str) -> str:
    """The arithmetic ``precision`` (:data:`~dlmuse_bids.settings.PRECISIONS`) means on a device.

    ``auto`` -> ``fp16`` on CUDA, ``fp32`` elsewhere; ``fast`` -> ``fp16`` on CUDA, ``bf16`` on a
    CPU with native bf16, else ``fp32``; other values unchanged.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == "fast":
        if device_type == "cuda":
            return "fp16"
        return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "fp32"
    return precision


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def torch_device(device: str) -> torch.device:
    """The torch device of an :attr:`InferenceOptions.device`, checked for availability."""
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    return dev


@dataclass
class PredictionInfo:
    """What happened during one prediction (for logs and provenance)."""

    shape_in: tuple[int, ...] = ()
    bbox: tuple[tuple[int, int], ...] = ()
    shape_network: tuple[int, ...] = ()
    n_tiles: int = 0  # network evaluations per mirror (tiles x folds)
    seconds: dict[str, float] = field(default_factory=dict)


class Predictor:
    """An nnU-Net v2 model (one or more folds) ready to segment images.

    Parameters
    ----------
    config
        The model's plans (see :func:`dlmuse_bids.nnunet.plans.load_model_config`).
    fold_weights
        One ``network_weights`` state dict per fold; predictions are averaged over folds.
    mirror_axes
        The checkpoint's ``inference_allowed_mirroring_axes``.
    options
        Device, threads, tile step and mirroring.
    """

    def __init__(
        self,
        config: ModelConfig,
        fold_weights: Sequence[dict],
        mirror_axes: Sequence[int] | None,
        options: InferenceOptions,
    ) -> None:
        if not fold_weights:
            raise ValueError("at least one fold's weights are needed")
        # before the first thread that runs a pass allocates: the tiles' freed blocks are then
        # kept for every thread's next pass (:mod:`.memory`)
        one_arena()
        self.config = config
        self.options = options
        self.device = torch_device(options.device)
        self.precision = resolve_precision(options.precision, self.device.type)
        self.mirror_axes = tuple(mirror_axes) if (mirror_axes and options.use_mirroring) else None
        self.threads_per_pass = resolve_threads_per_pass(
            options.threads_per_pass, self.device.type
        )
        self.network = build_network(
            config.architecture, config.num_input_channels, config.num_classes
        )
        # strict: a checkpoint that does not fit the plans is an error, not a silent mismatch
        for params in fold_weights:
            try:
                self.network.load_state_dict(params, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ValueError(
                    f"checkpoint does not match the plans' network ({first})"
                ) from exc
        # the folds' weights are loaded in turn for each image; a single fold's live in the
        # network only (a second copy is 336 MiB for DLICV, 188 MiB for DLMUSE)
        self.n_folds = len(fold_weights)
        self.fold_weights = list(fold_weights) if self.n_folds > 1 else []
        if self.fold_weights:
            self.network.load_state_dict(self.fold_weights[0], strict=True)
        self.network.to(self.device)
        if options.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        if self.precision == "bf16":
            # autocast runs each convolution on a bf16 copy of its weights: stored so, they are
            # the same values cast once, in half the memory (DLICV's: 168 MiB instead of 336)
            for module in self.network.modules():
                if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
                    module.to(torch.bfloat16)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    # -- array convention -------------------------------------------------------------------
    def _to_model_axes(
        self, image: np.ndarray, zooms: Sequence[float]
    ) -> tuple[np.ndarray, list[float]]:
        if self.config.axes_reversed:
            return image.transpose(2, 1, 0), [float(z) for z in zooms][::-1]
        return image, [float(z) for z in zooms]

    def _from_model_axes(self, labels: np.ndarray) -> np.ndarray:
        return labels.transpose(2, 1, 0) if self.config.axes_reversed else labels

    # -- steps --------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray, zooms: Sequence[float]) -> tuple[np.ndarray, dict]:
        """Transpose, crop to non-zero, normalise and resample one 3-D image (NIfTI order)."""
        arr, spacing = self._to_model_axes(np.asarray(image), zooms)
        # C order in the model's axes, as nnU-Net's reader gives it: the normalisation's sums
        # then run in one order whatever the caller's memory layout (a flipped or transposed
        # view of the same voxels), so the same voxels always give the same labels
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        tf = self.config.transpose_forward
        data = arr[None].transpose(0, *[t + 1 for t in tf])
        spacing_t = [spacing[i] for i in tf]
        shape_before = data.shape[1:]
        bbox, mask = nonzero_bbox(data)
        sl = bbox_slices(bbox)
        data = data[(slice(None), *sl)]
        mask = mask[sl]
        shape_cropped = data.shape[1:]
        target = list(self.config.spacing)
        new_shape = compute_new_shape(shape_cropped, spacing_t, target)
        for c, scheme in enumerate(self.config.normalization_schemes):
            if scheme == "ZScoreNormalization":
                zscore(data[c], mask if self.config.use_mask_for_norm[c] else None)
        data = resample_data(data, new_shape, spacing_t, target, self.config.resampling_data)
        props = {
            "spacing_t": spacing_t,
            "shape_before_cropping": shape_before,
            "bbox": bbox,
            "shape_after_cropping": shape_cropped,
        }
        return data, props

    @torch.inference_mode()
    def logits(self, data: np.ndarray) -> torch.Tensor:
        """Fold-averaged float16 logits of a preprocessed (C, X, Y, Z) image, on the CPU."""
        tensor = torch.from_numpy(np.ascontiguousarray(data)).to(torch.float32)
        result = None
        for params in self.fold_weights or [None]:
            if params is not None:
                self.network.load_state_dict(params, strict=True)
            fold = sliding_window_logits(
                self.network,
                tensor,
                self.config.num_classes,
                self.config.patch_size,
                tile_step_size=self.options.tile_step_size,
                mirror_axes=self.mirror_axes,
                device=self.device,
                results_device=self.device,
                autocast_dtype=_AUTOCAST_DTYPES.get(self.precision),
                channels_last=self.options.channels_last,
                threads_per_pass=self.threads_per_pass,
            ).to("cpu")
            if result is None:
                result = fold
            else:
                result += fold
        if self.n_folds > 1:
            result /= self.n_folds
        return result

    def export(self, logits: torch.Tensor, props: dict) -> np.ndarray:
        """Resample logits to the cropped input grid, argmax, paste back, undo transposes.

        The classes are resampled on as many threads as torch's (the predictor's
        ``num_threads`` inside :meth:`predict`), at most :data:`RESAMPLE_WORKERS`, each as
        nnU-Net does: the labels do not depend on the number.
        """
        channels = resampled_channels(
            logits.numpy(),
            props["shape_after_cropping"],
            list(self.config.spacing),
            props["spacing_t"],
            self.config.resampling_probabilities,
            workers=min(torch.get_num_threads(), RESAMPLE_WORKERS),
        )
        seg = streaming_argmax(channels)
        dtype = np.uint8 if self.config.num_classes <= 255 else np.uint16
        full = np.zeros(props["shape_before_cropping"], dtype=dtype)
        full[bbox_slices(props["bbox"])] = seg
        full = full.transpose(self.config.transpose_backward)
        return self._from_model_axes(full)

    def predict(
        self, image: np.ndarray, zooms: Sequence[float], info: PredictionInfo | None = None
    ) -> np.ndarray:
        """Label map (model classes) of one 3-D image given in NIfTI voxel order.

        Parameters
        ----------
        image
            3-D intensity array, axes as in the NIfTI file.
        zooms
            Voxel size in mm along those axes.
        info
            Optional record filled with shapes and timings.

        Returns
        -------
        numpy.ndarray
            Labels with the shape of ``image`` (uint8 when the model has <= 255 classes).
        """
        if image.ndim != 3:
            raise ValueError(f"expected a 3-D image, got shape {image.shape}")
        info = info if info is not None else PredictionInfo()
        with torch_threads(self.options.num_threads):
            t0 = time.perf_counter()
            data, props = self.preprocess(image, zooms)
            t1 = time.perf_counter()
            logits = self.logits(data)
            t2 = time.perf_counter()
            labels = self.export(logits, props)
            grid = tuple(data.shape[1:])
            del data, logits
            release_freed_memory()  # what the tiles freed is not resident for the next network
            t3 = time.perf_counter()
        info.shape_in = tuple(image.shape)
        info.bbox = props["bbox"]
        info.shape_network = grid
        padded = [max(s, t) for s, t in zip(grid, self.config.patch_size, strict=True)]
        info.n_tiles = (
            len(tile_slicers(padded, self.config.patch_size, self.options.tile_step_size))
            * self.n_folds
        )
        info.seconds = {"preprocess": t1 - t0, "network": t2 - t1, "export": t3 - t2}
        logger.debug(
            "%s: %s -> network grid %s in %.1f s",
            self.config.dataset_name,
            image.shape,
            grid,
            t3 - t0,
        )
        return labels
