"""Sliding-window inference with Gaussian importance weighting and mirroring, as nnU-Net v2 does.

The accumulation follows ``nnUNetPredictor._internal_predict_sliding_window_return_logits``
operation for operation (half-precision accumulators, Gaussian scaled to a maximum of 10, the same
order of mirror combinations), so that predictions match the reference engine bit for bit
wherever the network outputs do.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .memory import freed_memory_kept
from .network import conv_slabs, empty_or, memory_format_of

#: Channels per step when flipping or accumulating a tile's output (bounds temporary copies).
_CHANNEL_CHUNK = 16


def compute_steps(
    image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float
) -> list[list[int]]:
    """Tile start positions along each axis; tiles overlap by ``1 - tile_step_size``."""
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile step size must be in (0, 1], got {tile_step_size}")
    steps = []
    for size, tile in zip(image_size, tile_size, strict=True):
        if size < tile:
            raise ValueError(f"image axis of {size} voxels is smaller than the tile ({tile})")
        n = int(np.ceil((size - tile) / (tile * tile_step_size))) + 1
        stride = (size - tile) / (n - 1) if n > 1 else 0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


@lru_cache(maxsize=4)
def _gaussian_np(tile_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    return gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode="constant", cval=0)


def gaussian_importance(
    tile_size: Sequence[int],
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    sigma_scale: float = 1.0 / 8,
    value_scaling_factor: float = 10.0,
) -> torch.Tensor:
    """nnU-Net's Gaussian importance map: peak ``value_scaling_factor``, no zeros."""
    g = _gaussian_np(tuple(int(i) for i in tile_size), sigma_scale)
    g = g / (np.max(g) / value_scaling_factor)
    t = torch.from_numpy(g).to(device=device, dtype=dtype)
    zero = t == 0
    if zero.any():
        t[zero] = torch.min(t[~zero])
    return t


def pad_to_tile(
    data: torch.Tensor, tile_size: Sequence[int]
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of (C, X, Y, Z) up to the tile size, content centred.

    Returns the padded tensor and the slices that undo the padding.
    """
    shape = data.shape[1:]
    pads = [max(t - s, 0) for s, t in zip(shape, tile_size, strict=True)]
    below = [p // 2 for p in pads]
    if not any(pads):
        return data, tuple(slice(None) for _ in range(data.ndim))
    torch_pad: list[int] = []
    for p, b in zip(reversed(pads), reversed(below), strict=True):
        torch_pad += [b, p - b]
    padded = torch.nn.functional.pad(data, torch_pad, "constant", 0)
    undo = (slice(None), *[slice(b, b + s) for b, s in zip(below, shape, strict=True)])
    return padded, undo


def tile_slicers(
    image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float
) -> list[tuple[slice, ...]]:
    """Spatial slices of every tile, in nnU-Net's order (last axis fastest)."""
    steps = compute_steps(image_size, tile_size, tile_step_size)
    return [
        tuple(slice(s, s + t) for s, t in zip(start, tile_size, strict=True))
        for start in itertools.product(*steps)
    ]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial mirror axes, as tensor dims of a (B, C, ...) batch."""
    dims = [a + 2 for a in axes]
    return [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


@torch.inference_mode()
def predict_tile(
    network: torch.nn.Module,
    x: torch.Tensor,
    mirror_axes: Sequence[int] | None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Network output for one (1, C, ...) tile, averaged over mirrored copies when asked.

    bf16 outputs are accumulated in fp32 (8 mantissa bits would lose the average); fp32 and
    fp16 are accumulated as nnU-Net does, in their own dtype. A network with ``features`` and
    ``head`` (:class:`~dlmuse_bids.nnunet.network.UNet`) has its 1x1 head applied a slab of
    planes at a time (:func:`_head_slabs`), straight into the average: no whole second copy of
    a 152-class output, nor oneDNN's blocked copy of it, is ever held. Every element is computed
    as by the whole head. ``into``, the last tile's result (given up), receives this one's where
    it fits: the tiles of an image reuse one buffer, so that no hole of a tile's size opens in
    the heap between tiles (:func:`~.memory.freed_memory_kept`).
    """
    passes = [(), *(mirror_combinations(mirror_axes) if mirror_axes else [])]
    if not _has_head(network):
        return _predict_tile_whole(network, x, passes)
    prediction = None
    depth = x.shape[2]
    for dims in passes:
        features = network.features(torch.flip(x, dims) if dims else x)
        for planes, out in _head_slabs(network.head, features):
            if prediction is None:
                shape = (out.shape[0], out.shape[1], *features.shape[2:])
                prediction = _prediction_buffer(out, shape, into)
            if 2 in dims:  # the flipped input's planes lo..hi are the output's depth-hi..depth-lo
                r = range(depth)[planes]
                planes = slice(depth - r.stop, depth - r.start)
            if dims:
                _add_flipped(prediction[:, :, planes], out, dims)
            else:
                prediction[:, :, planes] = out
            del out
        del features
    if len(passes) > 1:
        prediction /= len(passes)
    return prediction


def _has_head(network: torch.nn.Module) -> bool:
    return hasattr(network, "features") and hasattr(network, "head")


def _predict_tile_whole(
    network: torch.nn.Module, x: torch.Tensor, passes: list[tuple[int, ...]]
) -> torch.Tensor:
    prediction = network(x)
    if prediction.dtype == torch.bfloat16:
        prediction = prediction.float()
    for dims in passes[1:]:
        _add_flipped(prediction, network(torch.flip(x, dims)), dims)
    if len(passes) > 1:
        prediction /= len(passes)
    return prediction


def _head_slabs(
    head: torch.nn.Conv3d, features: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The 1x1 head's output, a slab of planes at a time (:func:`~.network.conv_slabs`)."""
    return conv_slabs(head, lambda lo, hi: features[:, :, lo:hi], features)


def _prediction_buffer(
    first: torch.Tensor, shape: tuple[int, ...], reuse: torch.Tensor | None = None
) -> torch.Tensor:
    """A tensor of ``shape`` for a tile's output, laid out like ``first``: ``reuse`` where its
    shape, dtype, device and layout are those, else a new one."""
    dtype = torch.float32 if first.dtype == torch.bfloat16 else first.dtype
    return empty_or(reuse, shape, dtype, first.device, memory_format_of(first))


def _add_flipped(total: torch.Tensor, out: torch.Tensor, dims: tuple[int, ...]) -> None:
    """``total += flip(out, dims)``, a few channels at a time.

    Flipping the whole output at once would hold a third copy of a (C, tile) tensor (0.8 GB for
    DLMUSE's 152 classes); each element gets the same single addition either way.
    """
    for start in range(0, out.shape[1], _CHANNEL_CHUNK):
        part = slice(start, start + _CHANNEL_CHUNK)
        total[:, part] += torch.flip(out[:, part], dims)


def _accumulate(view: torch.Tensor, prediction: torch.Tensor, gaussian: torch.Tensor) -> None:
    """``view += prediction * gaussian`` for a float16 ``view``, a few channels at a time.

    The same arithmetic as nnU-Net's ``prediction *= gaussian; logits[sl] += prediction`` (fp32
    products, one rounding to fp16 per add), without mixed-dtype kernels; chunking keeps the
    fp32 copy of the accumulator to 16 channels (a whole copy is 0.8 GB for DLMUSE's tile).
    ``prediction`` is overwritten, unless it is bf16: that is widened to fp32 first (exactly),
    16 channels at a time, so that the products are not rounded to bf16.
    """
    for start in range(0, prediction.shape[0], _CHANNEL_CHUNK):
        part = slice(start, start + _CHANNEL_CHUNK)
        chunk = prediction[part]
        if chunk.dtype == torch.bfloat16:
            chunk = chunk.float()
        chunk *= gaussian
        view[part].copy_(view[part].float().add_(chunk))


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: A tile's prediction in pieces: (planes of the tile's first axis, (C, planes, ...) piece)
_Pieces = Iterator[tuple[slice, torch.Tensor]]


def _tile_predictions(
    network: torch.nn.Module,
    tiles: Iterator[tuple[tuple[slice, ...], torch.Tensor]],
    mirror_axes: Sequence[int] | None,
    autocast_dtype: torch.dtype | None,
    buffer: torch.Tensor | None = None,
) -> Iterator[tuple[tuple[slice, ...], _Pieces]]:
    """Each tile's (C, ...) prediction in pieces, one tile at a time with all of torch's
    threads. ``buffer``: where every mirrored tile's sum goes, where it fits
    (:func:`predict_tile`'s ``into``).

    Without mirroring, a network with a head (:class:`~dlmuse_bids.nnunet.network.UNet`) gives
    its head's output a slab of planes at a time, each piece to be accumulated before the next
    is computed: the tile's whole output (0.8 GB for DLMUSE) is never held. With mirroring, the
    slabs are summed over the mirrorings first (:func:`predict_tile`), in one piece.
    Each piece must be let go before the next is asked for.
    """
    direct = not mirror_axes and _has_head(network)
    for sl, tile in tiles:
        if direct:
            with _autocast(tile.device, autocast_dtype):
                features = network.features(tile)
            del tile
            yield sl, _head_pieces(network.head, features, autocast_dtype)
            del features
        else:
            with _autocast(tile.device, autocast_dtype):
                buffer = predict_tile(network, tile, mirror_axes, into=buffer)
            del tile
            yield sl, iter([(slice(None), buffer[0])])


def _head_pieces(
    head: torch.nn.Conv3d, features: torch.Tensor, autocast_dtype: torch.dtype | None
) -> _Pieces:
    slabs = _head_slabs(head, features)
    while True:
        with _autocast(features.device, autocast_dtype):
            slab = next(slabs, None)
        if slab is None:
            return
        planes, out = slab
        del slab
        yield planes, out[0]
        del out


def _network_pass(
    network: torch.nn.Module,
    tile: torch.Tensor,
    dims: tuple[int, ...],
    autocast_dtype: torch.dtype | None,
    threads: int,
) -> torch.Tensor:
    """The network's output for ``tile`` mirrored along ``dims``, mirrored back, on ``threads``.

    OpenMP's thread count belongs to the calling thread, so it is set in every pass.
    """
    torch.set_num_threads(threads)
    with torch.inference_mode(), _autocast(tile.device, autocast_dtype):
        out = network(torch.flip(tile, dims) if dims else tile)
    if out.dtype == torch.bfloat16:
        out = out.float()
    return torch.flip(out, dims) if dims else out


def _tile_predictions_parallel(
    network: torch.nn.Module,
    tiles: Iterator[tuple[tuple[slice, ...], torch.Tensor]],
    mirror_axes: Sequence[int] | None,
    autocast_dtype: torch.dtype | None,
    threads_per_pass: int,
) -> Iterator[tuple[tuple[slice, ...], _Pieces]]:
    """As :func:`_tile_predictions` (each tile in one piece); the passes of all tiles run
    several at a time.

    Each pass runs on ``threads_per_pass`` threads; the passes of a tile are summed in
    :func:`predict_tile`'s order (unmirrored first, then :func:`mirror_combinations`) and
    divided once, as there, so the result is what :func:`predict_tile` gives on
    ``threads_per_pass`` threads, bit for bit, whatever the number of workers. At most
    ``workers + 1`` passes are submitted ahead of the one being summed.
    """
    passes = [(), *(mirror_combinations(mirror_axes) if mirror_axes else [])]
    workers = max(1, torch.get_num_threads() // threads_per_pass)
    jobs = ((sl, tile, dims) for sl, tile in tiles for dims in passes)
    pending: deque = deque()
    with (
        torch_threads(threads_per_pass),
        ThreadPoolExecutor(workers, thread_name_prefix="dlmuse-pass") as pool,
    ):

        def submit_next() -> None:
            job = next(jobs, None)
            if job is not None:
                sl, tile, dims = job
                args = (network, tile, dims, autocast_dtype, threads_per_pass)
                pending.append((sl, pool.submit(_network_pass, *args)))

        try:
            for _ in range(workers + 1):
                submit_next()
            prediction, summed = None, 0
            while pending:
                sl, future = pending.popleft()
                out = future.result()[0]
                submit_next()
                prediction = out if prediction is None else prediction.add_(out)
                summed += 1
                if summed == len(passes):
                    if len(passes) > 1:
                        prediction /= len(passes)
                    yield sl, iter([(slice(None), prediction)])
                    prediction = out = None
                    summed = 0
        finally:
            for _, future in pending:
                future.cancel()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (torch's setting is process-wide; None or 0:
    leave it)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def sliding_window_logits(
    network: torch.nn.Module,
    data: torch.Tensor,
    num_classes: int,
    tile_size: Sequence[int],
    *,
    tile_step_size: float = 0.5,
    mirror_axes: Sequence[int] | None = (0, 1, 2),
    device: torch.device | None = None,
    results_device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    threads_per_pass: int | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of a (C, X, Y, Z) float32 image.

    Parameters
    ----------
    network
        The model, already on ``device`` and in eval mode.
    data
        Preprocessed image (any device; tiles are copied to ``device``).
    num_classes
        Number of output channels.
    tile_size
        The plans' patch size.
    tile_step_size
        Fraction of the tile between neighbouring tiles (0.5 = half overlap).
    mirror_axes
        Spatial axes for mirroring test-time augmentation, or None.
    device, results_device
        Where the network runs and where the accumulators live (default: both on ``data``'s
        device / ``device``).
    autocast_dtype
        Run the network under ``torch.autocast`` with this dtype (None: plain fp32).
    channels_last
        Feed tiles in the channels-last 3-D layout (the network must be converted too).
    threads_per_pass
        None: each network pass uses all of torch's threads, one pass at a time (as nnU-Net).
        ``k``: each pass (one tile, one mirroring) runs on exactly ``k`` threads and
        ``torch.get_num_threads() // k`` passes run at once; the outputs are summed in the
        sequential order, so the logits do not depend on the number of threads, only on ``k``.
        oneDNN's channels-last and bf16 kernels split their sums by thread, which makes this
        the way to get reproducible labels from them. Each pass in flight holds its own
        activations and output: meant for networks with few classes (DLICV).

    Returns
    -------
    torch.Tensor
        (num_classes, X, Y, Z) float16 logits on ``results_device``.
    """
    device = device or data.device
    results_device = results_device or device
    data = data.to(results_device)
    data, undo = pad_to_tile(data, tile_size)
    slicers = tile_slicers(data.shape[1:], tile_size, tile_step_size)
    logits = torch.zeros((num_classes, *data.shape[1:]), dtype=torch.half, device=results_device)
    weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
    gaussian = gaussian_importance(tile_size, results_device)
    gaussian_f32 = gaussian.float()
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    tiles = (
        (sl, torch.clone(data[(slice(None), *sl)][None], memory_format=layout).to(device))
        for sl in slicers
    )
    if threads_per_pass is None:
        buffer = None
        if mirror_axes and _has_head(network):  # the tiles' mirror sums, one at a time
            buffer = torch.empty(
                (1, num_classes, *tile_size),
                dtype=torch.float16 if autocast_dtype == torch.float16 else torch.float32,
                device=device,
                memory_format=layout,
            )
        predictions = _tile_predictions(network, tiles, mirror_axes, autocast_dtype, buffer)
    else:
        predictions = _tile_predictions_parallel(
            network, tiles, mirror_axes, autocast_dtype, threads_per_pass
        )
    # the tensors above (logits, weights, the mirror-sum buffer) are allocated before, and
    # outlive, the memory the tiles keep: they leave no holes in the heap the tiles reuse
    with freed_memory_kept():
        for sl, pieces in predictions:
            for planes, piece in pieces:
                rows = range(sl[0].start, sl[0].stop)[planes]
                view = logits[(slice(None), slice(rows.start, rows.stop), *sl[1:])]
                _accumulate(view, piece.to(results_device), gaussian_f32[planes])
                del piece  # not alive while the next piece, or the next tile, is computed
            weights[sl] += gaussian
    torch.div(logits, weights, out=logits)
    # a class at a time: a whole test would hold an |x| copy and a mask (1.4 GB for DLMUSE)
    if any(torch.isinf(channel).any() for channel in logits):
        raise FloatingPointError("infinite logits in the sliding-window average")
    return logits[undo]
