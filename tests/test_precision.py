"""Speed options of the engine: --precision, --fast (channels-last, bf16), and what they record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlmuse_bids.cli.bids_app import build_parser, make_settings
from dlmuse_bids.cli.common import PRECISION_CHOICES, speed_settings
from dlmuse_bids.cli.participant import _precision_label
from dlmuse_bids.models import find_model, load_trained_model
from dlmuse_bids.nnunet.predictor import (
    PRECISIONS,
    InferenceOptions,
    cpu_has_fast_bf16,
    resolve_precision,
)
from dlmuse_bids.nnunet.sliding_window import _add_flipped, predict_tile
from tests.conftest import needs_shared
from tests.support.bids import subsampled


def test_precision_choices_agree():
    assert PRECISION_CHOICES == PRECISIONS


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")
    assert InferenceOptions(precision="auto").autocast_dtype() is None
    assert InferenceOptions(precision="bf16").autocast_dtype() == torch.bfloat16


def test_chunked_flip_sum_is_the_plain_flip_sum():
    gen = torch.Generator().manual_seed(0)
    total = torch.randn(1, 40, 6, 5, 4, generator=gen)
    out = torch.randn(1, 40, 6, 5, 4, generator=gen)
    expected = total + torch.flip(out, (2, 4))
    _add_flipped(total, out, (2, 4))
    assert torch.equal(total, expected)


def test_bf16_mirror_average_is_accumulated_in_fp32():
    class Half(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.bfloat16)

    x = torch.full((1, 1, 2, 2, 2), 1.0 + 2**-10)  # not representable in bf16
    out = predict_tile(Half(), x, (0, 1, 2))
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ("auto", False, True)),
        (["--no-tta"], ("auto", False, False)),
        (["--precision", "bf16"], ("bf16", False, True)),
        (["--fast", "--precision", "fp32"], ("fp32", True, False)),
    ],
)
def test_speed_settings(argv, expected):
    args = build_parser().parse_args(["/in", "/out", "participant", *argv])
    assert speed_settings(args, "cpu") == expected


def test_fast_uses_bf16_only_where_the_cpu_has_it():
    args = build_parser().parse_args(["/in", "/out", "participant", "--fast"])
    precision, channels_last, tta = speed_settings(args, "cpu")
    assert precision == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert channels_last and not tta
    assert speed_settings(args, "cuda")[0] == "auto"  # fp16 autocast on a GPU


def test_the_sidecar_label_of_the_settings(tmp_path):
    (tmp_path / "in").mkdir()
    args = build_parser().parse_args(
        [str(tmp_path / "in"), str(tmp_path / "out"), "participant", "--fast", "--device", "cpu"]
    )
    settings = make_settings(args, {})
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert _precision_label(settings) == f"{expected}, channels-last"


@needs_shared
def test_faster_arithmetic_keeps_the_answer(tiny_models):
    """fp32 channels-last is the same segmentation; bf16 agrees on most voxels."""
    img = subsampled("sub-otsu_T1w.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    model = load_trained_model(find_model("DLICV", [tiny_models]))

    def labels(**options):
        opts = InferenceOptions(threads=2, use_mirroring=False, **options)
        return model.predictor(opts).predict(data, zooms)

    exact = labels()
    assert (labels(channels_last=True) == exact).mean() >= 0.999
    # random weights leave many near-ties between classes, so bf16 flips more voxels than the
    # official weights would; the bound is loose on purpose
    assert (labels(precision="bf16", channels_last=True) == exact).mean() >= 0.95


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_instance_norm_is_bit_identical_and_keeps_the_layout(affine, batch, layout):
    from dlmuse_bids.nnunet.network import InstanceNorm3d

    gen = torch.Generator().manual_seed(1)
    ours, reference = InstanceNorm3d(8, affine=affine), torch.nn.InstanceNorm3d(8, affine=affine)
    if affine:
        with torch.no_grad():
            for p in (ours.weight, ours.bias):
                p.copy_(torch.randn(8, generator=gen))
        reference.load_state_dict(ours.state_dict())
    x = (3 * torch.randn(batch, 8, 9, 7, 6, generator=gen) + 1).contiguous(memory_format=layout)
    got = ours(x)
    expected = reference(x.contiguous())
    if layout == torch.contiguous_format:  # the same kernel on the same memory: bit for bit
        assert torch.equal(got, expected)
    else:  # the channels-last kernel sums in another order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if batch == 1:
        assert got.is_contiguous(memory_format=layout)
