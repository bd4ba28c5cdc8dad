"""The arithmetic floor of ``--fast`` on this CPU: how long its convolutions alone must take.

``--fast`` runs every network tile once (no mirroring) in bf16, channels-last. Its time per
1 mm head cannot fall below (multiply-accumulates of all its tiles) / (the CPU's rate for the
networks' own convolutions). This script measures both, on the full-width networks (the
official plans, seeded random weights: the arithmetic is the real models'):

* multiply-accumulates per tile of each network, counted on every convolution by forward hooks
  (one tile, slabs off so each convolution is seen whole);
* tiles per scan: DLICV over the scan's network grid; DLMUSE over the crop of the brain-trained
  DLICV stand-in's mask (as ``compare_engines.py --icv standin`` crops it), both at the
  fast mode's tile step;
* the rate of one 3x3x3 convolution (32 -> 32 channels, DLICV's first stage on a whole tile,
  bf16 channels-last, the given threads) and the rate of a whole tile of each network in the
  fast mode's arithmetic.

The floor is the scan's operations at the convolution's rate; the achievable estimate is at
the whole tile's rate (norms, copies, concatenations and activations included). Preprocessing,
export and the pipeline's other steps come on top of both.

Usage::

    python benchmarks/fast_floor.py [--scans sub-otsu_T1w.nii.gz ...] [--threads 2]
        [--models DIR] [--target 40] [--out benchmarks/results]

Writes ``results/fast_floor.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.time_pipeline import cpu_model, full_width_models  # noqa: E402
from tests.support.paths import DATA_DIR  # noqa: E402

NETWORKS = ("DLICV", "DLMUSE")


def macs_per_tile(predictor) -> int:
    """Multiply-accumulates of one tile through ``predictor``'s network, every convolution."""
    import torch

    from dlmuse_bids.nnunet import network as net_module

    count = [0]

    def hook(module, inputs, output):
        k = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.ConvTranspose3d):
            count[0] += inputs[0].numel() * module.out_channels // module.groups * k
        else:
            count[0] += output.numel() * module.in_channels // module.groups * k

    handles = [
        m.register_forward_hook(hook)
        for m in predictor.network.modules()
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    ]
    slab_bytes, net_module.SLAB_BYTES = net_module.SLAB_BYTES, 2**62
    try:
        bf16 = predictor.precision == "bf16"  # its weights are then stored in bf16
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            predictor.network(torch.zeros(1, 1, *predictor.config.patch_size))
    finally:
        net_module.SLAB_BYTES = slab_bytes
        for h in handles:
            h.remove()
    return count[0]


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitives, first touch of the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def conv_rate(patch: tuple[int, ...], threads: int, repeats: int) -> float:
    """GFLOP/s of one bf16 channels-last 3x3x3 convolution, 32 -> 32 channels, over ``patch``."""
    import torch

    torch.set_num_threads(threads)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).to(torch.bfloat16)
    conv = conv.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 32, *patch, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        seconds = best_seconds(lambda: conv(x), repeats)
    return 2 * 32 * 32 * 27 * math.prod(patch) / seconds / 1e9


def tile_seconds(predictor, threads: int, repeats: int) -> float:
    """Seconds per tile in ``predictor``'s arithmetic, over a grid of two tiles (the fast mode
    runs two single-threaded passes side by side on two threads)."""
    import torch

    from dlmuse_bids.nnunet.sliding_window import sliding_window_logits, tile_slicers

    torch.set_num_threads(threads)
    opts = predictor.options
    patch = predictor.config.patch_size
    grid = (patch[0] + patch[0] // 2, *patch[1:])  # two tiles at step 0.5
    tiles = len(tile_slicers(grid, patch, opts.tile_step_size))
    image = torch.randn(1, *grid)
    return (
        best_seconds(
            lambda: sliding_window_logits(
                predictor.network,
                image,
                predictor.config.num_classes,
                patch,
                tile_step_size=opts.tile_step_size,
                mirror_axes=predictor.mirror_axes,
                device=predictor.device,
                results_device=predictor.device,
                autocast_dtype=torch.bfloat16 if predictor.precision == "bf16" else None,
                channels_last=opts.channels_last,
                threads_per_pass=predictor.threads_per_pass,
            ),
            repeats,
        )
        / tiles
    )


def n_tiles(predictor, image, zooms) -> tuple[int, tuple[int, ...]]:
    from dlmuse_bids.nnunet.sliding_window import tile_slicers

    data, _ = predictor.preprocess(image, zooms)
    grid = tuple(data.shape[1:])
    padded = [max(s, t) for s, t in zip(grid, predictor.config.patch_size, strict=True)]
    step = predictor.options.tile_step_size
    return len(tile_slicers(padded, predictor.config.patch_size, step)), grid


def scan_tiles(scan: Path, predictors: dict, standin) -> dict:
    """DLICV's tiles over the scan, DLMUSE's over the stand-in mask's crop."""
    import numpy as np

    from dlmuse_bids.io import load_t1w
    from dlmuse_bids.pipeline import lps_zooms, mask_and_crop, to_reference_orientation

    lps, _ = to_reference_orientation(load_t1w(scan))
    data, zooms = np.asarray(lps.dataobj, dtype=np.float32), lps_zooms(lps)
    dlicv_tiles, dlicv_grid = n_tiles(predictors["DLICV"], data, zooms)
    _, _, box, masked = mask_and_crop(data, standin.predict(data, zooms), zooms)
    dlmuse_tiles, dlmuse_grid = n_tiles(predictors["DLMUSE"], masked, zooms)
    return {
        "scan": scan.name,
        "zooms": [round(float(z), 3) for z in zooms],
        "DLICV": {"grid": dlicv_grid, "tiles": dlicv_tiles},
        "DLMUSE": {"grid": dlmuse_grid, "tiles": dlmuse_tiles, "crop": [b - a for a, b in box]},
    }


def table(result: dict) -> str:
    nets, target = result["networks"], result["target_s"]
    lines = [
        f"# `--fast`: the arithmetic floor ({result['cpu']}, {result['threads']} threads)",
        "",
        f"One 3x3x3 convolution (32 -> 32 channels, bf16 channels-last, DLICV's tile): "
        f"**{result['conv_gflops']:.0f} GFLOP/s**.",
        "",
        "| network | tile | GMAC per tile | whole tile (fast) | its rate |",
        "|---|---|---|---|---|",
    ]
    for name in NETWORKS:
        n = nets[name]
        lines.append(
            f"| {name} | {'x'.join(map(str, n['patch']))} | {n['macs'] / 1e9:.0f} | "
            f"{n['tile_s']:.2f} s | {n['tile_gflops']:.0f} GFLOP/s |"
        )
    lines += [
        "",
        "| scan | DLICV tiles | DLMUSE tiles (crop) | TFLOP | convolutions alone | "
        f"whole tiles | target {target:.0f} s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["scans"]:
        lines.append(
            f"| {s['scan']} | {s['DLICV']['tiles']} | {s['DLMUSE']['tiles']} "
            f"({'x'.join(map(str, s['DLMUSE']['crop']))}) | {s['tflop']:.1f} | "
            f"{s['floor_s']:.0f} s | {s['tiles_s']:.0f} s | "
            f"{'out of reach' if s['floor_s'] > target else 'not excluded'} |"
        )
    lines += [
        "",
        "Out of reach: the convolutions alone take longer than the target. "
        "Convolutions alone: the scan's operations at the single convolution's rate (the floor). "
        "Whole tiles: its tiles at the measured whole-tile times (norms, copies, concatenations "
        "and activations included); preprocessing, export and the other pipeline steps come on "
        "top. Command: `python benchmarks/fast_floor.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", nargs="+", default=["sub-otsu_T1w.nii.gz", "sub-chris_T1w.nii.gz"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target", type=float, default=40.0, help="seconds per head")
    p.add_argument("--models", type=Path, default=REPO / ".cache" / "full_width_models")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch

    from dlmuse_bids.models import find_model, load_trained_model
    from dlmuse_bids.settings import InferenceOptions, PipelineInference
    from tests.support.paths import STANDIN_DLICV

    if not STANDIN_DLICV.is_dir():
        sys.exit(f"the DLICV stand-in is absent: {STANDIN_DLICV}")
    torch.set_num_threads(args.threads)
    models = full_width_models(args.models)
    fast = PipelineInference.preset("fast", device="cpu", num_threads=args.threads)
    predictors = {
        "DLICV": load_trained_model(find_model("DLICV", [models])).predictor(fast.dlicv),
        "DLMUSE": load_trained_model(find_model("DLMUSE", [models])).predictor(fast.dlmuse),
    }
    standin = load_trained_model(STANDIN_DLICV).predictor(
        InferenceOptions(device="cpu", use_mirroring=False, num_threads=args.threads)
    )
    networks = {}
    for name, pred in predictors.items():
        macs = macs_per_tile(pred)
        seconds = tile_seconds(pred, args.threads, args.repeats)
        networks[name] = {
            "patch": list(pred.config.patch_size),
            "precision": pred.precision,
            "channels_last": pred.options.channels_last,
            "macs": macs,
            "tile_s": seconds,
            "tile_gflops": 2 * macs / seconds / 1e9,
        }
        print(f"{name}: {macs / 1e9:.0f} GMAC per tile, {seconds:.2f} s", flush=True)
    gflops = conv_rate(tuple(networks["DLICV"]["patch"]), args.threads, args.repeats)
    print(f"3x3x3 convolution: {gflops:.0f} GFLOP/s", flush=True)
    scans = []
    for scan in args.scans:
        row = scan_tiles(DATA_DIR / "t1w" / scan, predictors, standin)
        flop = sum(2 * row[n]["tiles"] * networks[n]["macs"] for n in NETWORKS)
        row["tflop"] = flop / 1e12
        row["floor_s"] = flop / (gflops * 1e9)
        row["tiles_s"] = sum(row[n]["tiles"] * networks[n]["tile_s"] for n in NETWORKS)
        scans.append(row)
        print(f"{scan}: {row['tflop']:.1f} TFLOP, floor {row['floor_s']:.0f} s", flush=True)
    result = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "target_s": args.target,
        "conv_gflops": gflops,
        "networks": networks,
        "scans": scans,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fast_floor.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
