"""Time the whole DLMUSE pipeline with our engine and with nnunetv2's predictor, same everything.

Both runs use the same model folders (the real DLICV and DLMUSE architectures from
``../shared/models/*/plans.json``, seeded random weights: the official weights cannot be fetched
here, and the arithmetic, time and memory are those of the real models), the same scans from
``../shared/data/t1w`` and the same pipeline steps (``DLMUSEPipeline``: LPS reorientation,
DLICV, ICV component and crop, DLMUSE, paste back, volumes); only the predictor differs. For
nnunetv2 it is ``nnUNetPredictor.predict_single_npy_array`` on the image as nnU-Net's
SimpleITK reader would give it.

Every (engine, scan) pair runs in a fresh process, so each peak RSS is its own. The table gives
per-stage seconds, CPU seconds, peak RSS, DLMUSE's network grid, and the voxel agreement of the
two label maps.

A random-weight DLICV draws a random mask, which would give DLMUSE a crop of a different size in
each engine whose DLICV arithmetic differs (and on each CPU), so DLMUSE's time and memory would
not compare. With ``--icv standin`` (the default where ``../shared/models-standin`` is) every
engine still runs its full-width DLICV network, timed, but hands the pipeline one fixed mask
per scan: the brain-trained DLICV stand-in's (1.15-1.6x a real ICV, so DLMUSE's crop errs
large). ``--icv network`` keeps the random network's own mask.

Usage::

    python benchmarks/compare_engines.py [--scans sub-otsu_T1w.nii.gz sub-chris_T1w.nii.gz]
        [--tta on|off] [--threads 2] [--device cpu|cuda]
        [--engines default exact fast nnunetv2] [--icv standin|network]
        [--models DIR]
        [--out benchmarks/results] [--stem NAME]

Engines: our ``exact``, ``default`` and ``fast`` modes as the commands run them, and
``nnunetv2``'s predictor as NiChart runs it. ``--tta off`` turns mirroring off in every engine.
Writes ``results/<stem>.json`` and ``.md`` (default stem ``engines_<device>_tta-<on|off>``).
nnunetv2 must be installed (``pip install --no-deps -r tests/requirements-reference.txt``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.time_pipeline import cpu_model, full_width_models, source_version  # noqa: E402

STAGES = ("load_models", "load", "reorient", "dlicv", "mask_crop", "dlmuse", "paste")


class NNUNetPredictor:
    """nnunetv2's predictor behind our ``Predictor.predict`` signature (NIfTI voxel order)."""

    def __init__(self, folder: Path, *, tta: bool, step_size: float, device: str) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from dlmuse_bids.models import load_trained_model

        self.config = load_trained_model(folder).config  # for the pipeline's class-count check
        self.predictor = nnUNetPredictor(
            tile_step_size=step_size,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=True,
            device=torch.device(device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self.predictor.initialize_from_trained_model_folder(
            str(folder), (0,), checkpoint_name="checkpoint_final.pth"
        )

    def predict(self, image, zooms, info=None):
        import numpy as np

        start = time.perf_counter()
        # SimpleITK's array order is (z, y, x): nnU-Net's SimpleITKIO reverses the NIfTI axes
        data = np.ascontiguousarray(image.transpose(2, 1, 0))[None].astype(np.float32)
        seg = self.predictor.predict_single_npy_array(
            data, {"spacing": [float(z) for z in zooms][::-1]}, None, None, False
        )
        if info is not None:
            info.seconds = {"network": time.perf_counter() - start}
        return np.asarray(seg).transpose(2, 1, 0)


#: Engines: our three inference modes, as the commands run them, and nnunetv2's predictor.
ENGINES = ("exact", "default", "fast", "nnunetv2")


class FixedMask:
    """A DLICV predictor that runs (and is timed as) ``inner`` but returns a fixed mask."""

    def __init__(self, inner, mask) -> None:
        self.inner, self.mask = inner, mask
        self.config = inner.config

    def predict(self, image, zooms, info=None):
        labels = self.inner.predict(image, zooms, info)
        if self.mask.shape != labels.shape:
            raise ValueError(f"fixed mask {self.mask.shape} does not fit the image {labels.shape}")
        return self.mask.astype(labels.dtype)


def standin_mask(scan: Path, out: Path) -> None:
    """The DLICV stand-in's raw labels of ``scan`` in the pipeline's LPS array (``--icv``)."""
    import numpy as np

    from dlmuse_bids.io import load_t1w
    from dlmuse_bids.models import load_trained_model
    from dlmuse_bids.pipeline import lps_zooms, to_reference_orientation
    from dlmuse_bids.settings import InferenceOptions
    from tests.support.paths import STANDIN_DLICV

    lps, _ = to_reference_orientation(load_t1w(scan))
    predictor = load_trained_model(STANDIN_DLICV).predictor(
        InferenceOptions(device="cpu", use_mirroring=False)
    )
    labels = predictor.predict(np.asarray(lps.dataobj, dtype=np.float32), lps_zooms(lps))
    np.save(out, labels)


def run_one(
    engine: str,
    scan: Path,
    models: Path,
    tta: bool,
    threads: int,
    device: str,
    labels_out: Path,
    icv_mask: Path | None = None,
) -> dict:
    """One pipeline run in this process: stage seconds, CPU seconds, peak RSS."""
    import nibabel as nib
    import torch

    from dlmuse_bids.io import load_t1w
    from dlmuse_bids.models import find_model, load_trained_model
    from dlmuse_bids.pipeline import DLMUSEPipeline
    from dlmuse_bids.runner import precision_label
    from dlmuse_bids.settings import NETWORKS, PipelineInference

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    dirs = [models]
    if engine == "nnunetv2":
        pipe = DLMUSEPipeline(
            *(
                NNUNetPredictor(find_model(key, dirs), tta=tta, step_size=0.5, device=device)
                for key in NETWORKS
            )
        )
        how = {k: {"mirroring": tta, "precision": "nnU-Net's"} for k in NETWORKS}
    else:
        inference = PipelineInference.preset(
            engine, device=device, num_threads=threads, use_mirroring=None if tta else False
        )
        pipe = DLMUSEPipeline(
            *(
                load_trained_model(find_model(k, dirs)).predictor(inference.network(k))
                for k in NETWORKS
            )
        )
        how = {
            k: {
                "mirroring": inference.network(k).use_mirroring,
                "precision": precision_label(inference.network(k)),
            }
            for k in NETWORKS
        }
    if icv_mask is not None:
        import numpy as np

        pipe.dlicv = FixedMask(pipe.dlicv, np.load(icv_mask))
    seconds = {"load_models": time.perf_counter() - t0}
    t1 = time.perf_counter()
    img = load_t1w(scan)
    seconds["load"] = time.perf_counter() - t1
    cpu0 = time.process_time()
    result = pipe.run(img)
    cpu = time.process_time() - cpu0
    seconds.update(result.seconds)
    nib.save(result.labels, labels_out)
    return {
        "engine": engine,
        "scan": scan.name,
        "shape": list(img.shape),
        "zooms": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
        "threads": threads,
        "device": device,
        "networks": how,
        "step_size": 0.5,
        "seconds": seconds,
        "pipeline_s": sum(v for k, v in seconds.items() if k != "load_models"),
        "cpu_s": cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "icv": "stand-in" if icv_mask is not None else "network",
        "dlmuse_grid": list(result.predictions["DLMUSE"].shape_network),
        "labels": str(labels_out),
    }


def agreement(a: Path, b: Path) -> dict:
    import nibabel as nib
    import numpy as np

    x, y = (np.asarray(nib.load(p).dataobj) for p in (a, b))
    inside = (x > 0) | (y > 0)
    return {
        "all_voxels": float((x == y).mean()),
        "labelled_voxels": float((x[inside] == y[inside]).mean()) if inside.any() else 1.0,
    }


def _table(runs: list[dict], agreements: dict) -> str:
    lines = [
        "| scan | engine | DLICV | DLMUSE | pipeline s | DLICV s | DLMUSE s | other s | CPU s "
        "| peak RSS GiB | DLMUSE grid | labels equal to nnunetv2's (labelled voxels) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["seconds"]
        other = r["pipeline_s"] - s["dlicv"] - s["dlmuse"]
        agree = agreements.get(f"{r['scan']} {r['engine']}")
        nets = [
            f"{n['precision']}, {'mirroring' if n['mirroring'] else 'no TTA'}"
            for n in r["networks"].values()
        ]
        lines.append(
            f"| {r['scan']} | {r['engine']} | {nets[0]} | {nets[1]} | "
            f"{r['pipeline_s']:.0f} | {s['dlicv']:.0f} | {s['dlmuse']:.0f} | {other:.1f} | "
            f"{r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | "
            f"{'x'.join(map(str, r.get('dlmuse_grid', []))) or '?'} | "
            f"{'' if agree is None else format(100 * agree['labelled_voxels'], '.3f') + ' %'} |"
        )
    by_scan: dict[str, dict[str, dict]] = {}
    for r in runs:
        by_scan.setdefault(r["scan"], {})[r["engine"]] = r
    for scan, engines in by_scan.items():
        if "nnunetv2" not in engines:
            continue
        ref = engines["nnunetv2"]
        for name, r in engines.items():
            if name != "nnunetv2":
                ratio = ref["pipeline_s"] / r["pipeline_s"]
                rss = ref["peak_rss_gib"] / r["peak_rss_gib"]
                lines.append(
                    f"\n{scan}: {name} is {ratio:.2f}x as fast as nnunetv2, "
                    f"{rss:.2f}x less peak RSS."
                )
    return "\n".join(lines) + "\n"


def _stem(args: argparse.Namespace) -> str:
    return args.stem or f"engines_{args.device}_tta-{args.tta}"


def _write_results(
    args: argparse.Namespace, icv: str, runs: list[dict], agreements: dict, done: list[str]
) -> None:
    """``<stem>.json`` and ``.md`` of the runs so far (rewritten after each scan)."""
    meta = {
        "machine": cpu_model(),
        "python": sys.version.split()[0],
        "commit": source_version(),
        "models": "full-width DLICV + DLMUSE (official plans), seeded random weights",
        "icv": {
            "standin": "DLMUSE cropped by the DLICV stand-in's mask, the same in every engine",
            "network": "DLMUSE cropped by each engine's random DLICV mask",
        }[icv],
        "note": "pipeline_s excludes model loading; agreement: labelled voxels of either map "
        "(meaningful for the exact mode only: random weights are near-ties everywhere)",
        "scans_done": done,
        "complete": done == list(args.scans),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _stem(args)
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "runs": runs, "agreement": agreements}, indent=2) + "\n"
    )
    cut = "" if meta["complete"] else f" Stopped after {', '.join(done)} of {len(args.scans)}."
    head = f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['models']}; {meta['icv']}."
    table = f"{head}{cut}\n\n" + _table(runs, agreements)
    (args.out / f"{stem}.md").write_text(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", nargs="+", default=["sub-otsu_T1w.nii.gz", "sub-chris_T1w.nii.gz"])
    p.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        default=["default", "nnunetv2"],
    )
    p.add_argument("--tta", choices=("on", "off"), default="on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", type=Path, default=REPO / ".cache" / "full_width_models")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--stem", help="name of the result files (default engines_<device>_tta-<on|off>)"
    )
    p.add_argument(
        "--icv",
        choices=("standin", "network"),
        help="DLMUSE's crop from the DLICV stand-in's mask (default where it is) or from the "
        "random network's",
    )
    p.add_argument("--one", nargs=3, metavar=("ENGINE", "SCAN", "LABELS"), help=argparse.SUPPRESS)
    p.add_argument("--icv-mask", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--standin-mask", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tta = args.tta == "on"
    if args.standin_mask:  # the child process that draws a scan's fixed mask
        standin_mask(*args.standin_mask)
        return 0
    if args.one:  # the child process of one run
        engine, scan, labels = args.one
        record = run_one(
            engine,
            Path(scan),
            args.models,
            tta,
            args.threads,
            args.device,
            Path(labels),
            args.icv_mask,
        )
        print("RESULT " + json.dumps(record), flush=True)
        return 0
    from tests.support.paths import DATA_DIR, STANDIN_DLICV

    icv = args.icv or ("standin" if STANDIN_DLICV.is_dir() else "network")
    if icv == "standin" and not STANDIN_DLICV.is_dir():
        sys.exit(f"--icv standin: {STANDIN_DLICV} is absent")
    models = full_width_models(args.models)
    runs, agreements = [], {}
    with tempfile.TemporaryDirectory(prefix="engines-") as tmp:
        for scan in args.scans:
            mask = Path(tmp) / f"standin_{scan}.npy"
            if icv == "standin":
                cmd = [sys.executable, __file__, "--standin-mask", str(DATA_DIR / "t1w" / scan)]
                subprocess.run([*cmd, str(mask)], check=True)
            labels = {}
            for engine in args.engines:
                labels[engine] = Path(tmp) / f"{engine}_{scan}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    engine,
                    str(DATA_DIR / "t1w" / scan),
                    str(labels[engine]),
                    "--tta",
                    args.tta,
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--models",
                    str(models),
                    *(["--icv-mask", str(mask)] if icv == "standin" else []),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"{engine} on {scan} failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(lines[-1].removeprefix("RESULT ")))
                print(json.dumps(runs[-1]), flush=True)
            if "nnunetv2" in labels:
                for engine in labels:
                    if engine != "nnunetv2":
                        agreements[f"{scan} {engine}"] = agreement(
                            labels[engine], labels["nnunetv2"]
                        )
            done = args.scans[: args.scans.index(scan) + 1]
            _write_results(args, icv, runs, agreements, done)  # a cut-short run keeps its scans
    print((args.out / f"{_stem(args)}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
