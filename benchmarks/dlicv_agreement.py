"""Agreement of DLICV inference modes with nnunetv2's, on the brain-trained DLICV stand-in.

Random weights make almost every voxel a near-tie, so any change of arithmetic (precision,
memory layout, mirroring, tiling) flips labels on them and agreement says nothing. The stand-in
in ``../shared/models-standin/`` (the official DLICV plans at a quarter of the width, trained on
real heads and ICV masks) has a clear winner at almost every voxel, like the real model: this
script measures each mode on it against nnunetv2's predictor with mirroring (as NiChart runs
DLICV), on the pipeline's own input (the scan in LPS order) and after the pipeline's ICV
component rule.

Per (scan, mode): voxel agreement over the whole image, Dice of the ICV mask, ICV volume and its
difference from the reference, network evaluations and seconds (stand-in width, so the seconds
are relative; full-width time is ``compare_engines.py``'s).

Usage::

    python benchmarks/dlicv_agreement.py [--scans sub-otsu_T1w.nii.gz sub-chris_T1w.nii.gz]
        [--modes exact no-mirroring ...] [--threads 2] [--out benchmarks/results]

Writes ``results/dlicv_agreement.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.compare_engines import NNUNetPredictor  # noqa: E402
from benchmarks.time_pipeline import cpu_model  # noqa: E402
from tests.support.paths import DATA_DIR, SHARED_DIR  # noqa: E402

STANDIN = SHARED_DIR / "models-standin" / "Dataset901_Task901_dlicv"

#: Inference modes under test: InferenceOptions fields (device and threads aside).
MODES: dict[str, dict] = {
    "exact": {"use_mirroring": True},
    "channels-last": {"use_mirroring": True, "channels_last": True},
    "bf16": {"use_mirroring": True, "precision": "bf16"},
    "bf16 channels-last (default mode)": {
        "use_mirroring": True,
        "precision": "bf16",
        "channels_last": True,
    },
    "no-mirroring": {"use_mirroring": False},
    "no-mirroring channels-last": {"use_mirroring": False, "channels_last": True},
    "no-mirroring bf16": {"use_mirroring": False, "precision": "bf16"},
    "no-mirroring bf16 channels-last (fast mode)": {
        "use_mirroring": False,
        "precision": "bf16",
        "channels_last": True,
    },
    "no-mirroring bf16 step 0.75": {
        "use_mirroring": False,
        "precision": "bf16",
        "tile_step_size": 0.75,
    },
    "no-mirroring bf16 step 1.0": {
        "use_mirroring": False,
        "precision": "bf16",
        "tile_step_size": 1.0,
    },
    # larger tiles than the plans' (fewer voxels evaluated twice), judged here, in no engine
    "fast mode, tiles whole along axes within 10 % of the patch": {
        "use_mirroring": False,
        "precision": "bf16",
        "channels_last": True,
        "tiling": "near-whole-axes",
    },
    "fast mode, patch x1.25": {
        "use_mirroring": False,
        "precision": "bf16",
        "channels_last": True,
        "tiling": 1.25,
    },
    "fast mode, the whole image as one tile": {
        "use_mirroring": False,
        "precision": "bf16",
        "channels_last": True,
        "tiling": "whole",
    },
}


def larger_patch(tiling, patch, grid, strides) -> tuple[int, ...]:
    """The patch of a ``tiling`` lever, in multiples of the network's total stride per axis.

    ``"whole"``: the whole network grid; a number: the plans' patch scaled by it (at most the
    grid); ``"near-whole-axes"``: the whole grid along every axis it exceeds the patch by at
    most 10 %, the plans' patch elsewhere.
    """
    import math

    out = []
    for axis, (p, g) in enumerate(zip(patch, grid, strict=True)):
        k = math.prod(s[axis] for s in strides)
        whole = math.ceil(g / k) * k
        if tiling == "whole":
            out.append(max(p, whole))
        elif tiling == "near-whole-axes":
            out.append(whole if p < g <= 1.1 * p else p)
        else:
            out.append(max(p, min(math.ceil(p * float(tiling) / k) * k, whole)))
    return tuple(out)


def lps_input(scan: Path):
    """The scan as the pipeline hands it to DLICV: LPS voxel order, float32, its zooms."""
    import numpy as np

    from dlmuse_bids.io import load_t1w
    from dlmuse_bids.pipeline import lps_zooms, to_reference_orientation

    lps, _ = to_reference_orientation(load_t1w(scan))
    return np.asarray(lps.dataobj, dtype=np.float32), lps_zooms(lps)


def icv_mask(raw, zooms):
    """The pipeline's ICV mask from a raw DLICV prediction (component rule applied)."""
    from dlmuse_bids.pipeline import select_icv_component

    return select_icv_component(raw, zooms)[0] > 0


def compare(mask, ref, zooms) -> dict:
    import numpy as np

    voxel_ml = float(np.prod(zooms)) / 1000
    both = np.count_nonzero(mask & ref)
    size, ref_size = np.count_nonzero(mask), np.count_nonzero(ref)
    return {
        "agreement": float((mask == ref).mean()),
        "dice": 2 * both / (size + ref_size) if size + ref_size else 1.0,
        "icv_ml": size * voxel_ml,
        "icv_diff_pct": 100 * (size - ref_size) / ref_size if ref_size else float("nan"),
        "differing_voxels": int(np.count_nonzero(mask != ref)),
    }


def run_mode(options: dict, data, zooms, threads: int):
    import dataclasses

    from dlmuse_bids.models import load_trained_model
    from dlmuse_bids.nnunet.predictor import PredictionInfo
    from dlmuse_bids.settings import InferenceOptions

    options = dict(options)
    tiling = options.pop("tiling", None)
    opts = InferenceOptions(device="cpu", num_threads=threads, **options)
    predictor = load_trained_model(STANDIN / "nnUNetTrainer__nnUNetPlans__3d_fullres").predictor(
        opts
    )
    if tiling is not None:
        config = predictor.config
        grid = predictor.preprocess(data, zooms)[0].shape[1:]
        patch = larger_patch(tiling, config.patch_size, grid, config.architecture.strides)
        predictor.config = dataclasses.replace(config, patch_size=patch)
    info = PredictionInfo()
    start = time.perf_counter()
    raw = predictor.predict(data, zooms, info)
    return raw, time.perf_counter() - start, info, predictor.config.patch_size


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", nargs="+", default=["sub-otsu_T1w.nii.gz", "sub-chris_T1w.nii.gz"])
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--table", action="store_true", help="rewrite the .md from the .json only")
    p.add_argument(
        "--append",
        action="store_true",
        help="add these modes' rows to the existing results (same reference, same machine)",
    )
    args = p.parse_args(argv)
    results = args.out / "dlicv_agreement.json"
    if args.table:
        saved = json.loads(results.read_text())
        (args.out / "dlicv_agreement.md").write_text(table(saved["rows"], saved["machine"]))
        return 0
    if not STANDIN.is_dir():
        p.error(f"{STANDIN} not found: the DLICV stand-in is needed")
    torch.set_num_threads(args.threads)
    folder = STANDIN / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    rows = []
    if args.append and results.is_file():
        rows = [r for r in json.loads(results.read_text())["rows"] if r["mode"] not in args.modes]
    for name in args.scans:
        data, zooms = lps_input(DATA_DIR / "t1w" / name)
        start = time.perf_counter()
        reference = NNUNetPredictor(folder, tta=True, step_size=0.5, device="cpu")
        ref = icv_mask(reference.predict(data, zooms), zooms)
        ref_s = time.perf_counter() - start
        row = {"scan": name, "mode": "nnunetv2 (mirroring)", "seconds": ref_s}
        row.update(compare(ref, ref, zooms))
        print(json.dumps(row), flush=True)
        if not args.append:
            rows.append(row)
        for mode in args.modes:
            raw, seconds, info, patch = run_mode(MODES[mode], data, zooms, args.threads)
            row = {
                "scan": name,
                "mode": mode,
                "options": MODES[mode],
                "seconds": seconds,
                "tiles": info.n_tiles,
                "patch": list(patch),
                "evaluations": info.n_tiles * (8 if MODES[mode]["use_mirroring"] else 1),
            }
            row.update(compare(icv_mask(raw, zooms), ref, zooms))
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__}
    order = {m: i for i, m in enumerate(["nnunetv2 (mirroring)", *MODES])}
    rows.sort(
        key=lambda r: (
            args.scans.index(r["scan"]) if r["scan"] in args.scans else 99,
            order[r["mode"]],
        )
    )
    (args.out / "dlicv_agreement.json").write_text(
        json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n"
    )
    (args.out / "dlicv_agreement.md").write_text(table(rows, meta))
    return 0


def tiles(row: dict) -> str:
    """Tiles per mirroring, with the patch where the row gives it."""
    if "tiles" not in row:
        return ""
    return (
        f"{row['tiles']} ({'x'.join(map(str, row['patch']))})"
        if "patch" in row
        else str(row["tiles"])
    )


def table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"DLICV stand-in (official plans at 1/4 width, brain-trained), {meta['cpu']}, "
        f"{meta['threads']} threads. Reference: nnunetv2's predictor with mirroring, tile step "
        "0.5; every mask after the pipeline's ICV component rule. Seconds are at the stand-in's "
        "width (time at full width: compare_engines.py).",
        "",
        "| scan | mode | agreement (all voxels) | differing voxels | Dice | ICV mL | ICV vs ref "
        "| tiles (patch) | seconds (stand-in width, indicative) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scan']} | {r['mode']} | {100 * r['agreement']:.4f} % | "
            f"{r['differing_voxels']} | {r['dice']:.5f} | {r['icv_ml']:.1f} | "
            f"{r['icv_diff_pct']:+.3f} % | {tiles(r)} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
