"""The nnU-Net-compatible engine, piece by piece, against nnunetv2's own functions."""

from __future__ import annotations

import copy
import json
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from dlmuse_bids.nnunet import network
from dlmuse_bids.nnunet.network import build_network
from dlmuse_bids.nnunet.plans import PlansError, ResamplingSpec, parse_plans
from dlmuse_bids.nnunet.preprocessing import (
    compute_new_shape,
    nonzero_bbox,
    resample_data,
    resampled_channels,
    separate_z_axis,
    streaming_argmax,
    zscore,
)
from dlmuse_bids.nnunet.sliding_window import (
    compute_steps,
    gaussian_importance,
    mirror_combinations,
    pad_to_tile,
    torch_threads,
)
from tests.support.paths import DLICV_PLANS_SOURCE, DLMUSE_PLANS_SOURCE, OFFICIAL_MODELS_DIR

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnunetv2 (the reference engine) not installed")
needs_shared = pytest.mark.skipif(
    not OFFICIAL_MODELS_DIR.is_dir(), reason=f"official plans not found at {OFFICIAL_MODELS_DIR}"
)
SOURCES = [DLICV_PLANS_SOURCE, DLMUSE_PLANS_SOURCE]


def _load(source):
    return (
        json.loads((source / "plans.json").read_text()),
        json.loads((source / "dataset.json").read_text()),
    )


def _reference_network(plans, num_classes):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = PlansManager(copy.deepcopy(plans)).get_configuration("3d_fullres")
    return cm, get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        num_classes,
        allow_init=True,
        deep_supervision=False,
    )


@needs_shared
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_official_plans_build_the_reference_network(source):
    plans, dataset = _load(source)
    config = parse_plans(plans, dataset)
    assert config.reader == "SimpleITKIO" and config.axes_reversed
    torch.manual_seed(0)
    cm, ref = _reference_network(plans, config.num_classes)
    ours = build_network(config.architecture, 1, config.num_classes)
    ref_sd = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    ref.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert list(config.patch_size) == list(cm.patch_size)
    assert list(config.spacing) == list(cm.spacing)


@needs_shared
def test_current_architecture_form_parses_like_legacy():
    from tests.support.models import legacy_to_architecture

    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    legacy = parse_plans(plans, dataset)
    current_plans = copy.deepcopy(plans)
    cfg = current_plans["configurations"]["3d_fullres"]
    current_plans["configurations"]["3d_fullres"] = legacy_to_architecture(cfg)
    assert "architecture" in current_plans["configurations"]["3d_fullres"]
    assert parse_plans(current_plans, dataset).architecture == legacy.architecture


@needs_shared
def test_unsupported_plans_are_refused():
    plans, dataset = _load(DLICV_PLANS_SOURCE)
    bad = copy.deepcopy(plans)
    bad["configurations"]["3d_fullres"]["UNet_class_name"] = "SwinUNETR"
    with pytest.raises(PlansError, match="SwinUNETR"):
        parse_plans(bad, dataset)
    bad = copy.deepcopy(plans)
    bad["image_reader_writer"] = "Tiff3DIO"
    with pytest.raises(PlansError, match="Tiff3DIO"):
        parse_plans(bad, dataset)
    with pytest.raises(PlansError, match="2d_foo"):
        parse_plans(plans, dataset, "2d_foo")


def test_residual_encoder_unet_matches_reference():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet."
        "ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [4, 8, 16],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 1]],
            "n_blocks_per_stage": [1, 2, 2],
            "n_conv_per_stage_decoder": [1, 1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = {
        "dataset_name": "x",
        "image_reader_writer": "NibabelIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "patch_size": [32, 32, 32],
                "spacing": [1, 1, 1],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "architecture": arch,
            }
        },
    }
    dataset = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2}}
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    ref = ResidualEncoderUNet(
        1,
        3,
        [4, 8, 16],
        torch.nn.Conv3d,
        3,
        [[1, 1, 1], [2, 2, 2], [2, 2, 1]],
        [1, 2, 2],
        3,
        [1, 1],
        True,
        torch.nn.InstanceNorm3d,
        {"eps": 1e-5, "affine": True},
        None,
        None,
        torch.nn.LeakyReLU,
        {"inplace": True},
    ).eval()
    ours = build_network(config.architecture, 1, 3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)


#: network.SLAB_BYTES budgets: every convolution whole, a plane at a time, uneven slabs
_SLABS = {"whole": 2**62, "plane-at-a-time": 1, "uneven": 5 * 32 * 32 * 16 * 8}


def _slabs_of_any_size(monkeypatch, budget: int) -> None:
    """Slabs of ``budget`` bytes, however small (no floor for oneDNN's kernels)."""
    monkeypatch.setattr(network, "SLAB_BYTES", budget)
    monkeypatch.setattr(network, "_ONEDNN_MIN_CDH", 1)


@needs_shared
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_convolutions_in_slabs_compute_the_whole_network(layout, monkeypatch):
    """The slabs' bounds, face padding and fused upsampling are the whole network's maths.

    In float64 (one convolution algorithm whatever the shape) so that only indexing errors
    could show; the bits of the real kernels are the next test's.
    """
    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes).double()
    fmt = torch.channels_last_3d if layout == "channels-last" else torch.contiguous_format
    net.to(memory_format=fmt)
    x = torch.randn(1, 1, 48, 32, 16, dtype=torch.float64).contiguous(memory_format=fmt)
    outputs = {}
    with torch.inference_mode():
        for name, budget in _SLABS.items():
            _slabs_of_any_size(monkeypatch, budget)
            outputs[name] = net.features(x)
    whole = outputs.pop("whole")
    for name, out in outputs.items():
        assert network.memory_format_of(out) == network.memory_format_of(whole), name
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-12, msg=name)


@needs_shared
@pytest.mark.parametrize(
    ("source", "fast"),
    [(DLMUSE_PLANS_SOURCE, False), (DLMUSE_PLANS_SOURCE, True), (DLICV_PLANS_SOURCE, True)],
    ids=["DLMUSE-fp32", "DLMUSE-bf16-channels-last", "DLICV-bf16-channels-last"],
)
def test_convolutions_in_slabs_are_bit_identical_on_a_full_tile(source, fast, monkeypatch):
    """On a full-width tile (its real sizes: oneDNN picks its kernels by shape, and torch uses
    oneDNN only above a size), slabs give the whole network's bits, in the default budget and
    in a smaller one; the segmentation head's slabs too. As each mode runs each network."""
    from dlmuse_bids.nnunet.sliding_window import _head_slabs

    plans, dataset = _load(source)  # the official, full-width plans
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes)
    fmt = torch.channels_last_3d if fast else torch.contiguous_format
    net.to(memory_format=fmt)
    x = torch.randn(1, 1, *config.patch_size).contiguous(memory_format=fmt)
    outputs, heads = {}, {}
    budgets = {"whole": 2**62, "default": network.SLAB_BYTES, "4 MiB": 2**22}
    with torch_threads(2), torch.inference_mode():
        for name, budget in budgets.items():
            monkeypatch.setattr(network, "SLAB_BYTES", budget)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                outputs[name] = features = net.features(x)
                heads[name] = [(p, out[:, :8]) for p, out in _head_slabs(net.head, features)]
    whole = outputs.pop("whole")
    for name, out in outputs.items():
        assert out.is_contiguous(memory_format=fmt), name
        assert torch.equal(out, whole), name
    (_, head), *_ = heads.pop("whole")
    for name, slabs in heads.items():
        assert len(slabs) > 1, name
        for planes, out in slabs:
            assert torch.equal(out, head[:, :, planes]), (name, planes)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("budget", ["plane-at-a-time", "uneven"])
def test_a_convolution_written_over_its_input_is_unchanged(kernel, budget, monkeypatch):
    """Slabs written over the input they read (``into``) give the bits of slabs written into a
    fresh tensor: the planes a later slab reads below its own are carried, never re-read."""
    _slabs_of_any_size(monkeypatch, _SLABS[budget])
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, kernel, padding=kernel // 2).double()
    x = torch.randn(1, 16, 23, 32, 32, dtype=torch.float64)
    keep = x.clone()
    with torch.inference_mode():
        fresh = network.conv_in_slabs(conv, lambda lo, hi: x[:, :, lo:hi], x)
        assert torch.equal(x, keep)  # without ``into`` the input is only read
        over = network.conv_in_slabs(conv, lambda lo, hi: x[:, :, lo:hi], x, into=x)
        whole = conv(keep)
    assert over.data_ptr() == x.data_ptr()
    assert torch.equal(over, fresh)
    torch.testing.assert_close(over, whole, rtol=0, atol=1e-12)


def test_an_output_that_does_not_fit_is_not_written_over_the_input(monkeypatch):
    _slabs_of_any_size(monkeypatch, 1)
    conv = torch.nn.Conv3d(8, 16, 3, padding=1).double()  # more channels out than in
    x = torch.randn(1, 8, 6, 8, 8, dtype=torch.float64)
    keep = x.clone()
    with torch.inference_mode():
        out = network.conv_in_slabs(conv, lambda lo, hi: x[:, :, lo:hi], x, into=x)
    assert out.shape == (1, 16, 6, 8, 8)
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, conv(keep).detach(), rtol=0, atol=1e-12)


@needs_shared
def test_each_resolution_holds_one_feature_map(monkeypatch):
    """The decoder writes each stage over its skip and each block over the one before: its
    full-resolution output lies in the storage of the encoder's first skip."""
    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes).double()
    x = torch.randn(1, 1, 48, 32, 16, dtype=torch.float64)
    _slabs_of_any_size(monkeypatch, _SLABS["uneven"])
    with torch.inference_mode():
        skips = net.encoder(x)
        full_resolution = skips[0].data_ptr()
        out = net.decoder.features(skips)
    assert out.data_ptr() == full_resolution


@pytest.mark.parametrize(
    "size,tile,step",
    [
        ((160, 200, 150), (112, 128, 96), 0.5),
        ((112, 128, 96), (112, 128, 96), 0.5),
        ((300, 129, 113), (160, 128, 112), 0.5),
        ((300, 129, 200), (160, 128, 96), 0.3),
        ((257, 255, 254), (160, 128, 112), 1.0),
    ],
)
def test_sliding_window_steps_match(size, tile, step):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    assert compute_steps(size, tile, step) == compute_steps_for_sliding_window(size, tile, step)


@pytest.mark.parametrize("tile", [(112, 128, 96), (160, 128, 112), (20, 17, 9)])
def test_gaussian_matches(tile):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    ref = compute_gaussian(
        tile, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")
    )
    ours = gaussian_importance(tile, torch.device("cpu"))
    assert ours.dtype == ref.dtype == torch.float16
    assert torch.equal(ours, ref)


def test_padding_matches():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    x = torch.randn(1, 50, 130, 90)
    ref, ref_slicer = pad_nd_image(x, (112, 128, 96), "constant", {"value": 0}, True, None)
    ours, undo = pad_to_tile(x, (112, 128, 96))
    assert torch.equal(ours, ref)
    assert torch.equal(ours[undo], x)


def test_mirror_combinations_order():
    assert mirror_combinations((0, 1, 2)) == [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def test_nonzero_crop_and_zscore_match():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        ZScoreNormalization,
    )

    rng = np.random.default_rng(0)
    data = np.zeros((1, 40, 50, 45), np.float32)
    data[0, 5:30, 10:45, 3:40] = rng.random((25, 35, 37), dtype=np.float32) * 100
    data[0, 15:18, 20:22, 10:12] = 0  # a hole: filled in the mask, normalised too
    ref_data, ref_seg, ref_bbox = crop_to_nonzero(data.copy())
    bbox, mask = nonzero_bbox(data)
    assert [list(b) for b in bbox] == [list(b) for b in ref_bbox]
    ours = data[(slice(None), *[slice(a, b) for a, b in bbox])].copy()
    np.testing.assert_array_equal(mask[tuple(slice(a, b) for a, b in bbox)], ref_seg[0] >= 0)
    for use_mask in (True, False):
        ref = ZScoreNormalization(use_mask, {}).run(ref_data[0].copy(), ref_seg[0])
        got = zscore(
            ours[0].copy(), mask[tuple(slice(a, b) for a, b in bbox)] if use_mask else None
        )
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "spacing,target",
    [
        ((0.868, 0.868, 1.0), (1.0, 1.0, 1.0)),
        ((1.2, 0.9, 0.9), (1.0, 1.0, 1.0)),
        ((3.0, 0.9, 0.9), (1.0, 1.0, 1.0)),  # separate z
        ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ],
)
def test_resampling_matches(spacing, target):
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape as ref_new_shape,
    )
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 23, 31, 27)).astype(np.float32)
    shape = compute_new_shape(data.shape[1:], spacing, target)
    assert list(shape) == list(ref_new_shape(data.shape[1:], spacing, target))
    ref = resample_data_or_seg_to_shape(
        data.copy(),
        shape,
        spacing,
        target,
        is_seg=False,
        order=3,
        order_z=0,
        force_separate_z=None,
    )
    ours = resample_data(data.copy(), shape, spacing, target, ResamplingSpec(3, 0, None))
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    # export path: float16 logits back to the original grid, then argmax
    logits = torch.from_numpy(rng.normal(size=(5, *shape)).astype(np.float16))
    ref_back = resample_data_or_seg_to_shape(
        logits,
        data.shape[1:],
        target,
        spacing,
        is_seg=False,
        order=1,
        order_z=0,
        force_separate_z=None,
    )
    chans = list(
        resampled_channels(
            logits.numpy(), data.shape[1:], target, spacing, ResamplingSpec(1, 0, None)
        )
    )
    np.testing.assert_array_equal(np.stack(chans), ref_back)
    np.testing.assert_array_equal(
        streaming_argmax(iter(chans)), torch.from_numpy(np.asarray(ref_back)).argmax(0).numpy()
    )


@pytest.mark.parametrize("workers", [2, 3])
def test_resampling_on_several_threads_gives_each_channel_in_order(workers):
    """Channels resampled side by side come out in class order, each equal to one thread's."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 9, 11, 10)).astype(np.float16)
    args = ((12, 14, 13), (1.0, 1.0, 1.0), (0.8, 0.8, 0.8), ResamplingSpec(1, 0, None))
    one = list(resampled_channels(logits, *args))
    several = list(resampled_channels(logits, *args, workers=workers))
    assert len(several) == len(one) == 7
    for a, b in zip(one, several, strict=True):
        assert b.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    # stopping early (an error in the consumer) leaves no thread running
    channels = resampled_channels(logits, *args, workers=workers)
    next(channels)
    channels.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dlmuse-resample")]


def test_separate_z_rule():
    spec = ResamplingSpec(3, 0, None)
    assert separate_z_axis(spec, (1, 1, 3.5), (1, 1, 1)) == 2
    assert separate_z_axis(spec, (1, 1, 1), (1, 4, 1)) == 1
    assert separate_z_axis(spec, (1, 1, 1.2), (1, 1, 1)) is None
    assert separate_z_axis(spec, (3.5, 3.5, 1), (1, 1, 1)) is None  # two low-res axes
    assert separate_z_axis(ResamplingSpec(3, 0, False), (1, 1, 3.5), (1, 1, 1)) is None


def test_streaming_argmax_ties_take_the_first():
    a = np.array([[1.0, 2.0, 2.0]])
    b = np.array([[1.0, 3.0, 2.0]])
    assert streaming_argmax(iter([a, b])).tolist() == [[0, 1, 0]]


@needs_shared
@pytest.mark.parametrize("mirror", [None, (0, 1, 2)], ids=["plain", "mirrored"])
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "bf16-channels-last"])
def test_head_in_pieces_is_the_whole_head(mirror, fast):
    """predict_tile's head (one slab at this size) gives the whole network's output, bit for
    bit."""
    from dlmuse_bids.nnunet.sliding_window import predict_tile
    from tests.support.reference import mirror_average

    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes)
    x = torch.randn(1, 1, 32, 32, 32)
    layout = torch.channels_last_3d if fast else torch.contiguous_format
    net.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
        pieces = predict_tile(net, x, mirror)
        whole = mirror_average(net, x, mirror or ())
    assert pieces.dtype == whole.dtype == torch.float32
    assert pieces.is_contiguous(memory_format=layout)
    assert torch.equal(pieces, whole)


@needs_shared
def test_the_tiles_of_an_image_share_one_mirror_sum():
    """Each mirrored tile's sum is written over the last tile's (one buffer for the image, no
    tile-sized hole in the heap between tiles), and is still that tile's own average, bit for
    bit (the unmirrored pass overwrites every element)."""
    from dlmuse_bids.nnunet.sliding_window import _tile_predictions, predict_tile

    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes)
    tiles = [((slice(i, i + 32),), torch.randn(1, 1, 32, 32, 32)) for i in range(3)]
    with torch.inference_mode():
        expected = [predict_tile(net, tile, (0, 1)) for _, tile in tiles]
        seen = []
        for (sl, pieces), (tile_sl, _), want in zip(
            _tile_predictions(net, iter(tiles), (0, 1), None), tiles, expected, strict=True
        ):
            ((planes, piece),) = list(pieces)
            assert sl == tile_sl and planes == slice(None)
            assert torch.equal(piece, want[0])
            seen.append(piece.data_ptr())
            piece.mul_(0.5)  # the consumer may write over it, as the accumulation does
    assert len(set(seen)) == 1


@pytest.mark.parametrize("mirror", [None, (0, 1, 2)], ids=["plain", "mirrored"])
@pytest.mark.parametrize("budget", list(_SLABS.values())[1:], ids=list(_SLABS)[1:])
def test_head_in_slabs_lands_every_plane_where_it_belongs(mirror, budget, monkeypatch):
    """predict_tile's head a slab at a time (flipped back planes included) is the whole
    network's mirrored average (float64: only misplaced planes could differ)."""
    from dlmuse_bids.nnunet.sliding_window import predict_tile
    from tests.support.reference import mirror_average

    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes).double()
    x = torch.randn(1, 1, 48, 32, 16, dtype=torch.float64)
    with torch.inference_mode():
        whole = mirror_average(net, x, mirror or ())
        _slabs_of_any_size(monkeypatch, budget)
        pieces = predict_tile(net, x, mirror)
    torch.testing.assert_close(pieces.float(), whole, rtol=0, atol=1e-6)


@needs_shared
@pytest.mark.parametrize("layout", ["fortran", "flipped-transposed"])
def test_the_memory_layout_of_the_input_changes_nothing(tiny_models, layout):
    """The same voxels in another memory layout are normalised bit for bit alike (bf16 would
    otherwise turn last-bit differences of the z-score into different labels)."""
    from dlmuse_bids.models import find_model, load_trained_model
    from dlmuse_bids.settings import InferenceOptions
    from tests.conftest import synthetic_head

    data = np.asarray(synthetic_head().dataobj, dtype=np.float32)
    if layout == "fortran":
        other = np.asfortranarray(data)
    else:  # a view with negative and permuted strides holding the same array values
        other = np.flip(
            np.ascontiguousarray(np.flip(data, 0).transpose(2, 1, 0)).transpose(2, 1, 0), 0
        )
    assert np.array_equal(other, data) and other.strides != data.strides
    model = load_trained_model(find_model("DLICV", [tiny_models]))
    predictor = model.predictor(InferenceOptions(device="cpu", num_threads=1, use_mirroring=False))
    zooms = (2.0, 2.0, 2.0)
    assert np.array_equal(
        predictor.preprocess(data, zooms)[0], predictor.preprocess(other, zooms)[0]
    )


@pytest.mark.parametrize(
    "dtype, norm_dtype, fmt",
    [
        (torch.float32, torch.float32, torch.contiguous_format),
        (torch.float32, torch.float32, torch.channels_last_3d),
        (torch.bfloat16, torch.float32, torch.channels_last_3d),
        (torch.bfloat16, torch.bfloat16, torch.channels_last_3d),
        (torch.float64, torch.float64, torch.contiguous_format),
    ],
    ids=["fp32", "fp32-channels-last", "bf16-map-fp32-norm", "bf16", "fp64"],
)
def test_instance_norm_in_place_is_the_forward_bit_for_bit(dtype, norm_dtype, fmt):
    """``normalize_`` writes into its input exactly what ``forward`` returns (a bf16 predictor's
    maps are bf16, its norms' parameters fp32)."""
    torch.manual_seed(0)
    norm = network.InstanceNorm3d(6, eps=1e-5, affine=True).to(norm_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(1, 6, 9, 10, 11) * 3 + 1).to(dtype).to(memory_format=fmt)
    with torch.inference_mode():
        expected = norm(x)
        y = x.clone(memory_format=torch.preserve_format)
        result = norm.normalize_(y)
    assert result.data_ptr() == y.data_ptr()  # no second feature map
    assert result.dtype == dtype and result.is_contiguous(memory_format=fmt)
    assert torch.equal(result, expected)


def test_instance_norm_in_place_falls_back_where_it_cannot_be_in_place():
    """A batch of two, or a tensor autograd tracks, gets the ordinary out-of-place forward."""
    norm = network.InstanceNorm3d(3, affine=True)
    for x in (torch.randn(2, 3, 4, 4, 4), torch.randn(1, 3, 4, 4, 4, requires_grad=True)):
        before = x.detach().clone()
        result = norm.normalize_(x)
        assert result.data_ptr() != x.data_ptr()
        assert torch.equal(x.detach(), before)
        assert torch.allclose(result, norm(x))


#: what both glibc scripts below start with: malloc, free, touched blocks and the RSS
_GLIBC_PRELUDE = """
import ctypes, sys
from dlmuse_bids.nnunet import memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def touched(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
"""


def _glibc_script(script: str, *args: str) -> str:
    """What ``script`` writes, run with ``args`` in a fresh interpreter (glibc's settings are
    process-wide)."""
    import subprocess

    from tests.support.paths import REPO_ROOT

    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return proc.stdout


_MEMORY_SCRIPT = (
    _GLIBC_PRELUDE
    + """

def dropped_by_free(size):
    block = touched(size)
    before = rss()
    libc.free(block)
    return before - rss()


big = 64 * 2**20  # over glibc's mmap threshold: its own mapping, unmapped on free
small = 100 * 1024  # under it: served from the heap
out = [dropped_by_free(big)]
with memory.freed_memory_kept() as kept:
    out += [kept, dropped_by_free(big)]
    with memory.freed_memory_kept():  # nested: only the outermost block acts
        pass
    out.append(dropped_by_free(big))
    before = rss()
out.append(before - rss())  # what the block kept, returned on leaving it
out.append(dropped_by_free(big))  # the default is back
blocks = [touched(small) for _ in range(400)]
for block in blocks[::2]:  # holes between live blocks: free, but never trimmed by free()
    libc.free(block)
before = rss()
out += [memory.release_freed_memory(), before - rss()]
sys.stdout.write(" ".join(map(str, out)))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_inside_the_block_and_returned_after():
    """A freed 64 MB block stays resident for reuse inside ``freed_memory_kept`` (also after a
    nested block has left), returns to the kernel when the outermost block is left, and is
    unmapped on free outside it; ``release_freed_memory`` returns the holes of the heap."""
    out = _glibc_script(_MEMORY_SCRIPT)
    before, kept, inside, nested, on_leaving, after, released, holes = out.split()
    big = 64 * 2**20
    assert kept == "True" and released == "True"
    assert int(before) > big - 2**20 and int(after) > big - 2**20
    assert abs(int(inside)) < 2**20 and abs(int(nested)) < 2**20
    assert int(on_leaving) > big - 2**20
    assert int(holes) > 15 * 2**20


_THRESHOLD_SCRIPT = (
    _GLIBC_PRELUDE
    + """

libc.free(touched(16 * 2**20))  # a freed mapping under 32 MB raises glibc's dynamic threshold
with memory.freed_memory_kept():
    pass
block, above = touched(4 * 2**20), touched(100 * 1024)  # the small one pins a heap block
before = rss()
libc.free(block)
sys.stdout.write(str(before - rss()))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_leaving_the_block_puts_a_fixed_mmap_threshold_back():
    """After the block, a 4 MB block is a mapping of its own, unmapped on free, even where a freed
    16 MB mapping had raised glibc's dynamic threshold (which the block froze): blocks made
    between two networks' tiles must not grow, and be pinned in, the heap the tiles keep."""
    out = _glibc_script(_THRESHOLD_SCRIPT)
    assert int(out) > 3 * 2**20


@needs_shared
def test_keeping_freed_memory_changes_no_label(tiny_models, monkeypatch):
    """Predictions with glibc keeping freed blocks (what the sliding window does) and without
    are bit-identical, and the block was really entered."""
    import contextlib

    from dlmuse_bids.models import find_model, load_trained_model
    from dlmuse_bids.nnunet import memory, sliding_window
    from dlmuse_bids.settings import InferenceOptions
    from tests.conftest import synthetic_head

    entered = []

    def counted():
        entered.append(True)
        return memory.freed_memory_kept()

    options = InferenceOptions(device="cpu", num_threads=1, use_mirroring=False)
    predictor = load_trained_model(find_model("DLICV", [tiny_models])).predictor(options)
    data = np.asarray(synthetic_head().dataobj, dtype=np.float32)
    monkeypatch.setattr(sliding_window, "freed_memory_kept", counted)
    kept = [predictor.predict(data, (2.0, 2.0, 2.0)) for _ in range(2)]  # the 2nd reuses
    monkeypatch.setattr(sliding_window, "freed_memory_kept", contextlib.nullcontext)
    plain = predictor.predict(data, (2.0, 2.0, 2.0))
    assert len(entered) == 2
    assert np.array_equal(kept[0], plain) and np.array_equal(kept[1], plain)


@needs_shared
@pytest.mark.parametrize("mirror", [None, (0, 1, 2)], ids=["plain", "mirrored"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_passes_run_together_give_one_pass_at_a_time_on_one_thread(mirror, threads):
    """Several one-thread passes at once (tiles and mirrorings) sum to what one pass at a time
    on one thread gives, bit for bit, and the thread count is restored after."""
    from dlmuse_bids.nnunet.sliding_window import sliding_window_logits, torch_threads

    plans, dataset = _load(DLICV_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes).to(
        memory_format=torch.channels_last_3d
    )
    data = torch.randn(1, 48, 40, 40)  # 2 x 2 x 2 tiles of 32^3

    def logits(n: int, threads_per_pass: int | None) -> torch.Tensor:
        with torch_threads(n):
            out = sliding_window_logits(
                net, data, config.num_classes, (32, 32, 32), mirror_axes=mirror,
                autocast_dtype=torch.bfloat16, channels_last=True,
                threads_per_pass=threads_per_pass,
            )  # fmt: skip
            assert torch.get_num_threads() == n
        return out

    assert torch.equal(logits(threads, 1), logits(1, None))
    if threads > 1 and mirror is None:  # the control: these kernels split their sums by thread
        assert not torch.equal(logits(threads, None), logits(1, None))


@needs_shared
def test_a_failing_pass_is_raised_and_stops_the_rest():
    from dlmuse_bids.nnunet.sliding_window import sliding_window_logits, torch_threads

    calls = []

    class Broken(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("pass 3 failed")
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    with torch_threads(2), pytest.raises(RuntimeError, match="pass 3 failed"):
        sliding_window_logits(
            Broken(), torch.zeros(1, 64, 64, 64), 2, (16, 16, 16), mirror_axes=(0, 1, 2),
            threads_per_pass=1,
        )  # fmt: skip
    assert len(calls) <= 3 + 3  # the passes already submitted, never the other 509


class _Under(torch.nn.Module):
    """``net`` run under bf16 autocast in the channels-last layout, its output widened to fp32:
    what the fast mode's network pass gives, for nnunetv2's sliding window to accumulate."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x.contiguous(memory_format=torch.channels_last_3d)).float()


@needs_shared
@pytest.mark.parametrize("mirror", [None, (0, 1, 2)], ids=["plain", "mirrored"])
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "bf16-channels-last"])
def test_sliding_window_is_nnunets_bit_for_bit(mirror, fast):
    """Our sliding window (152 classes: the head in several pieces, accumulated straight into
    the logits without mirroring) gives nnunetv2's logits bit for bit, blends included."""
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from dlmuse_bids.nnunet.sliding_window import sliding_window_logits, torch_threads

    plans, dataset = _load(DLMUSE_PLANS_SOURCE)
    config = parse_plans(plans, dataset)
    torch.manual_seed(0)
    net = build_network(config.architecture, 1, config.num_classes)
    if fast:
        net.to(memory_format=torch.channels_last_3d)
    data = torch.randn(1, 48, 40, 24)  # 2 x 2 tiles of 32^3 after padding z
    tile = (32, 32, 32)
    ref = nnUNetPredictor(
        use_mirroring=mirror is not None, perform_everything_on_device=False,
        device=torch.device("cpu"), allow_tqdm=False,
    )  # fmt: skip
    ref.network = _Under(net) if fast else net
    ref.allowed_mirroring_axes = mirror
    ref.configuration_manager = SimpleNamespace(patch_size=list(tile))
    ref.label_manager = SimpleNamespace(num_segmentation_heads=config.num_classes)
    with torch_threads(2):
        expected = ref.predict_sliding_window_return_logits(data)
        ours = sliding_window_logits(
            net, data, config.num_classes, tile, mirror_axes=mirror,
            autocast_dtype=torch.bfloat16 if fast else None, channels_last=fast,
        )  # fmt: skip
    assert ours.dtype == expected.dtype == torch.float16
    assert torch.equal(ours, expected)


_ARENA_SCRIPT = (
    _GLIBC_PRELUDE
    + """
import tempfile
import numpy as np
from dlmuse_bids.models import load_trained_model
from dlmuse_bids.settings import InferenceOptions
from tests.conftest import synthetic_head


def arenas():
    with tempfile.NamedTemporaryFile("r") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return f.read().count("<heap nr=")


libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
if sys.argv[2] == "predictor":
    options = InferenceOptions(device="cpu", num_threads=2, threads_per_pass=1)
    predictor = load_trained_model(sys.argv[1]).predictor(options)
    predictor.predict(np.asarray(synthetic_head().dataobj, dtype=np.float32), (2.0, 2.0, 2.0))
else:  # threads that allocate, in a process where no predictor was made
    import torch
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: torch.ones(2**20).sum(), range(8)))
sys.stdout.write(str(arenas()))
"""
)


@needs_shared
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_threads_of_a_predictor_share_one_arena(tiny_models):
    """A predictor's pool threads (passes run several at once) allocate from glibc's main arena,
    where the freed blocks of a tile are kept for the next; threads in a process without a
    predictor get arenas of their own (the control)."""
    from dlmuse_bids.models import find_model

    folder = str(find_model("DLICV", [tiny_models]))
    counts = {
        case: int(_glibc_script(_ARENA_SCRIPT, folder, case)) for case in ("predictor", "control")
    }
    assert counts["predictor"] == 1 and counts["control"] > 1, counts
