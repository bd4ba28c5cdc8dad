"""Speed options of the engine: --precision, --fast (channels-last, bf16), and what they record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dlmuse_bids.cli.bids_app import build_parser, make_settings
from dlmuse_bids.models import load_trained_model
from dlmuse_bids.nnunet.predictor import resolve_precision
from dlmuse_bids.nnunet.sliding_window import predict_tile
from dlmuse_bids.runner import precision_label
from dlmuse_bids.settings import InferenceOptions, PipelineInference
from tests.support.paths import DATA_DIR, STANDIN_DLICV
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


def test_bf16_weights_are_what_autocast_computes_with(tiny_models):
    """A bf16 predictor stores its convolutions' weights in bf16 (half the memory); the logits
    are those of fp32 weights under autocast, bit for bit."""
    from dlmuse_bids.models import find_model
    from dlmuse_bids.nnunet.sliding_window import sliding_window_logits
    from tests.conftest import synthetic_head

    model = load_trained_model(find_model("DLICV", [tiny_models]))
    predictor = model.predictor(InferenceOptions(precision="bf16", channels_last=True))
    fp32 = model.predictor(InferenceOptions(precision="fp32", channels_last=True))
    convs = [m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(p.dtype == torch.float32 for p in fp32.network.parameters())
    head = torch.from_numpy(np.asarray(synthetic_head().dataobj, dtype=np.float32))[None]
    config = model.config
    logits = [
        sliding_window_logits(
            p.network,
            head,
            config.num_classes,
            config.patch_size,
            mirror_axes=(0, 1, 2),
            autocast_dtype=torch.bfloat16,
            channels_last=True,
        )  # fmt: skip
        for p in (predictor, fp32)
    ]
    assert torch.equal(*logits)


# (precision, channels-last, threads per pass)
ONE_THREAD, SHARED, EXACT = ("fast", True, 1), ("fast", True, None), ("auto", False, None)


@pytest.mark.parametrize(
    ("argv", "mode", "step", "mirroring", "dlicv", "dlmuse"),
    [
        ([], "default", 0.5, True, ONE_THREAD, EXACT),
        (["--no-tta"], "default", 0.5, False, ONE_THREAD, EXACT),
        (["--mode", "exact"], "exact", 0.5, True, EXACT, EXACT),
        (
            ["--precision", "bf16", "--step-size", "0.25"],
            "default",
            0.25,
            True,
            ("bf16", True, 1),
            ("bf16", False, None),
        ),
        (["--fast"], "fast", 0.5, False, ONE_THREAD, SHARED),
        (["--mode", "fast"], "fast", 0.5, False, ONE_THREAD, SHARED),
        (
            ["--fast", "--precision", "fp32"],
            "fast",
            0.5,
            False,
            ("fp32", True, 1),
            ("fp32", True, None),
        ),
    ],
)
def test_the_options_reach_the_settings_whole(
    tmp_path, argv, mode, step, mirroring, dlicv, dlmuse
):
    (tmp_path / "in").mkdir()
    args = build_parser().parse_args([str(tmp_path / "in"), "/out", "participant", *argv])
    inference = make_settings(args, {}).inference
    assert inference.mode == mode
    for options, arithmetic in ((inference.dlicv, dlicv), (inference.dlmuse, dlmuse)):
        assert (options.tile_step_size, options.use_mirroring) == (step, mirroring)
        assert (options.precision, options.channels_last, options.threads_per_pass) == arithmetic


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
    assert precision_label(settings.inference.dlmuse) == f"{expected}, channels-last"
    # a GPU-less machine resolves auto to the CPU, where --fast means the same
    auto = make_settings(build_parser().parse_args([*args_of(tmp_path), "--fast"]), {})
    assert precision_label(auto.inference.dlmuse) == f"{expected}, channels-last"
    # the default mode: DLICV faster, DLMUSE as nnU-Net
    default = make_settings(build_parser().parse_args(args_of(tmp_path)), {}).inference
    assert precision_label(default.dlicv) == f"{expected}, channels-last"
    assert precision_label(default.dlmuse) == "fp32"


@pytest.mark.skipif(not STANDIN_DLICV.is_dir(), reason=f"{STANDIN_DLICV} (DLICV stand-in) absent")
def test_faster_dlicv_arithmetic_keeps_the_answer():
    """The fast mode's DLICV arithmetic (bf16 where native, channels-last) labels a real head
    like fp32 does, on a brain-trained model (random weights are near-ties everywhere)."""
    img = nib.load(DATA_DIR / "t1w" / "sub-otsu_T1w.nii.gz")
    # one DLICV tile of the 1 mm head around its centre: the brain, the skull and some air
    centre = [n // 2 for n in img.shape]
    box = tuple(
        slice(c - n // 2, c + n // 2) for c, n in zip(centre, (112, 160, 128), strict=True)
    )
    data = np.asarray(img.dataobj, dtype=np.float32)[box]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    model = load_trained_model(STANDIN_DLICV)
    preset = PipelineInference.preset("fast", device="cpu", num_threads=2)

    def labels(options):
        return model.predictor(options).predict(data, zooms)

    fast = preset.dlicv  # bf16 on this CPU if it has native bf16, fp32 otherwise; channels-last
    exact = labels(replace(fast, precision="fp32", channels_last=False))
    assert 0.2 < exact.mean() < 0.8, "the crop holds brain and non-brain"
    assert (labels(replace(fast, precision="fp32")) == exact).mean() >= 0.999
    assert (labels(fast) == exact).mean() >= 0.999


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
