"""nnU-Net v2 preprocessing and resampling, reproduced with numpy/scipy only.

Order of operations (nnU-Net's ``DefaultPreprocessor``): transpose -> crop to the non-zero box ->
normalise -> resample to the plans' spacing. Export reverses it: resample back -> paste into the
uncropped grid -> transpose back. Resampling reproduces ``skimage.transform.resize``
(``mode='edge'``, no anti-aliasing, output clipped to the input range) through
``scipy.ndimage.zoom`` with ``grid_mode=True``, and nnU-Net's separate-z rule for anisotropic
data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from .plans import ANISO_THRESHOLD, ResamplingSpec

BBox = tuple[tuple[int, int], ...]  # half-open [start, stop) per axis


def nonzero_bbox(data: np.ndarray) -> tuple[BBox, np.ndarray]:
    """Bounding box of the non-zero voxels of a (C, X, Y, Z) array and the hole-filled mask.

    Matches nnU-Net's ``crop_to_nonzero``: the mask is non-zero in any channel, holes filled.
    An all-zero image gives the full extent.
    """
    mask = np.any(data != 0, axis=0)
    mask = ndimage.binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(bbox), mask


def bbox_slices(bbox: BBox) -> tuple[slice, ...]:
    """Slices selecting a half-open bounding box."""
    return tuple(slice(a, b) for a, b in bbox)


def zscore(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """nnU-Net's ``ZScoreNormalization`` on one float32 channel, in place.

    With ``mask`` (``use_mask_for_norm``) only voxels inside it are normalised; the others keep
    their value (zero, since the mask covers every non-zero voxel).
    """
    eps = 1e-8
    if mask is not None:
        values = image[mask]
        mean, std = values.mean(), values.std()
        image[mask] = (values - mean) / max(std, eps)
    else:
        mean, std = image.mean(), image.std()
        image -= mean
        image /= max(std, eps)
    return image


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling from ``spacing`` to ``new_spacing`` (nnU-Net's rounding)."""
    return tuple(
        int(round(s / n * k)) for s, n, k in zip(spacing, new_spacing, shape, strict=True)
    )


def separate_z_axis(
    spec: ResamplingSpec, spacing: Sequence[float], new_spacing: Sequence[float]
) -> int | None:
    """The axis nnU-Net resamples separately (nearest neighbour), or None.

    Mirrors ``determine_do_sep_z_and_axis``: forced by the plans, or chosen when the current,
    else the target, spacing is anisotropic beyond :data:`ANISO_THRESHOLD`; never when more than
    one axis has the largest spacing.
    """

    def lowres(sp: Sequence[float]) -> np.ndarray:
        sp = np.asarray(sp, dtype=float)
        return np.where(max(sp) / sp == 1)[0]

    def aniso(sp: Sequence[float]) -> bool:
        return max(sp) / min(sp) > ANISO_THRESHOLD

    if spec.force_separate_z is not None:
        axes = lowres(spacing) if spec.force_separate_z else None
    elif aniso(spacing):
        axes = lowres(spacing)
    elif aniso(new_spacing):
        axes = lowres(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def _resize(img: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(img, shape, order, mode='edge', anti_aliasing=False)``."""
    img = np.asarray(img, dtype=np.float64)
    if tuple(img.shape) == tuple(shape):
        # skimage still runs zoom here; with identical grids the spline interpolates exactly
        return img.copy()
    factors = np.divide(img.shape, shape)
    out = ndimage.zoom(img, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, img.min(), img.max(), out=out)
    return out


def resample_channel(
    img: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None, order_z: int = 0
) -> np.ndarray:
    """Resample one 3-D channel like nnU-Net's ``resample_data_or_seg`` (``is_seg=False``).

    Returns float64; the caller casts to the dtype nnU-Net would store.
    """
    shape = np.array(img.shape)
    new_shape = np.array(new_shape)
    if np.all(shape == new_shape):
        return np.asarray(img)
    if axis is None:
        return _resize(img, new_shape, order)
    inplane = [a for a in range(3) if a != axis]
    tmp_shape = new_shape.copy()
    tmp_shape[axis] = shape[axis]
    tmp = np.zeros(tmp_shape)
    for i in range(shape[axis]):
        index = [slice(None)] * 3
        index[axis] = i
        tmp[tuple(index)] = _resize(img[tuple(index)], new_shape[inplane], order)
    if shape[axis] == new_shape[axis]:
        return tmp
    scale = np.array(tmp.shape, dtype=float) / new_shape
    grid = np.mgrid[: new_shape[0], : new_shape[1], : new_shape[2]].astype(float)
    coords = scale[:, None, None, None] * (grid + 0.5) - 0.5
    return ndimage.map_coordinates(tmp, coords, order=order_z, mode="nearest")


def resample_data(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    spec: ResamplingSpec,
) -> np.ndarray:
    """Resample a (C, X, Y, Z) image to ``new_shape`` keeping its dtype (nnU-Net data path)."""
    if tuple(data.shape[1:]) == tuple(new_shape):
        return data
    axis = separate_z_axis(spec, spacing, new_spacing)
    out = np.empty((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        out[c] = resample_channel(data[c], new_shape, spec.order, axis, spec.order_z)
    return out


def resampled_channels(
    logits: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    spec: ResamplingSpec,
    workers: int = 1,
) -> Iterator[np.ndarray]:
    """Yield each channel of ``logits`` resampled to ``new_shape``, cast back to its dtype.

    Streaming one channel at a time keeps memory at one channel of float64 (per worker) instead
    of nnU-Net's whole float64 copy of every class; the values are the same. ``workers`` threads
    resample channels side by side (scipy's interpolation releases the GIL), yielded in order;
    at most ``workers`` channels are in flight beyond the one yielded.
    """
    n = logits.shape[0]
    if tuple(logits.shape[1:]) == tuple(new_shape):
        yield from (logits[c] for c in range(n))
        return
    axis = separate_z_axis(spec, spacing, new_spacing)

    def channel(c: int) -> np.ndarray:
        out = resample_channel(logits[c], new_shape, spec.order, axis, spec.order_z)
        return out.astype(logits.dtype)

    if workers <= 1:
        yield from (channel(c) for c in range(n))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dlmuse-resample") as pool:
        pending = deque(pool.submit(channel, c) for c in range(min(workers, n)))
        for c in range(workers, n + workers):
            done = pending.popleft().result()
            if c < n:
                pending.append(pool.submit(channel, c))
            yield done


def streaming_argmax(channels: Iterator[np.ndarray]) -> np.ndarray:
    """Index of the first maximal channel, computed one channel at a time (ties: lowest index)."""
    best = None
    arg = None
    for c, channel in enumerate(channels):
        if best is None:
            best = np.array(channel, copy=True)
            arg = np.zeros(channel.shape, dtype=np.uint16)
            continue
        better = channel > best
        best[better] = channel[better]
        arg[better] = c
    if arg is None:
        raise ValueError("no channels to take the argmax of")
    return arg
