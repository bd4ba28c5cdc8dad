"""Speed options of the engine: --precision, --fast (channels-last, bf16), and what they record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dlmuse_bids.cli.bids_app import build_parser, make_settings
from dlmuse_bids.models import find_model, load_trained_model
from dlmuse_bids.nnunet.predictor import resolve_precision
from dlmuse_bids.nnunet.sliding_window import predict_tile
from dlmuse_bids.runner import precision_label
from dlmuse_bids.settings import InferenceOptions
from tests.conftest import needs_shared
from tests.support.bids import subsampled
from tests.support.reference import mirror_average


def _cpu_flags_say_bf16() -> bool:
    """What the kernel says of this CPU (not what torch says): native bf16 matmul units."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return "avx512_bf16" in flags or "amx_bf16" in flags


NATIVE_BF16 = _cpu_flags_say_bf16()


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fast", "cuda") == "fp16"
    assert resolve_precision("fast", "cpu") == ("bf16" if NATIVE_BF16 else "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match="precision"):
        InferenceOptions(precision="int8")
    with pytest.raises(ValueError, match="step"):
        InferenceOptions(tile_step_size=0)


def test_mirror_average_is_nnunets_plain_sum():
    """predict_tile's chunked in-place flip sum (many channels) is nnU-Net's sum, bit for bit."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 40, 3, padding=1)  # a plain module: the whole-output path
    x = torch.randn(1, 1, 6, 5, 4)
    with torch.inference_mode():
        assert torch.equal(predict_tile(net, x, (0, 1, 2)), mirror_average(net, x, (0, 1, 2)))


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
        ([], ("auto", 0.5, True, False)),
        (["--no-tta"], ("auto", 0.5, False, False)),
        (["--precision", "bf16", "--step-size", "0.25"], ("bf16", 0.25, True, False)),
        (["--fast"], ("fast", 0.5, False, True)),
        (["--fast", "--precision", "fp32"], ("fp32", 0.5, False, True)),
    ],
)
def test_the_options_reach_the_settings_whole(tmp_path, argv, expected):
    (tmp_path / "in").mkdir()
    args = build_parser().parse_args([str(tmp_path / "in"), "/out", "participant", *argv])
    options = make_settings(args, {}).inference
    assert (
        options.precision,
        options.tile_step_size,
        options.use_mirroring,
        options.channels_last,
    ) == expected


def test_a_bad_step_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["/in", "/out", "participant", "--step-size", "1.5"])
    assert exc.value.code == 64
    assert "step size must be in (0, 1]" in capsys.readouterr().err


def args_of(tmp_path):
    return [str(tmp_path / "in"), str(tmp_path / "out"), "participant"]


def test_the_sidecar_label_of_the_settings(tmp_path):
    (tmp_path / "in").mkdir()
    args = build_parser().parse_args(
        [str(tmp_path / "in"), str(tmp_path / "out"), "participant", "--fast", "--device", "cpu"]
    )
    settings = make_settings(args, {})
    expected = "bf16" if NATIVE_BF16 else "fp32"
    assert precision_label(settings.inference) == f"{expected}, channels-last"
    # a GPU-less machine resolves auto to the CPU, where --fast means the same
    auto = make_settings(build_parser().parse_args([*args_of(tmp_path), "--fast"]), {})
    assert precision_label(auto.inference) == f"{expected}, channels-last"


@needs_shared
def test_faster_arithmetic_keeps_the_answer(tiny_models):
    """fp32 channels-last is the same segmentation; bf16 agrees on most voxels."""
    img = subsampled("sub-otsu_T1w.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    model = load_trained_model(find_model("DLICV", [tiny_models]))

    def labels(**options):
        opts = InferenceOptions(num_threads=2, use_mirroring=False, **options)
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
