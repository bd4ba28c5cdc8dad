"""Time the DLMUSE pipeline of dlmuse-bids on real scans with full-width random-weight models.

The official weights cannot be fetched in CI, so the networks are the real DLICV and DLMUSE
architectures (from ``../shared/models/*/plans.json``, 32 -> 320 features) with seeded random
weights: the arithmetic, and so the time and memory, are those of the real models.

Usage::

    python benchmarks/time_pipeline.py [--scan sub-otsu_T1w.nii.gz] [--tta both|on|off]
        [--threads N] [--device cpu|cuda] [--out benchmarks/results]

Writes ``results/pipeline_<device>_tta-<mode>.json`` and ``.md`` with per-stage seconds and
peak RSS (run one TTA mode per process for a clean peak RSS).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlmuse_bids.io import load_t1w  # noqa: E402
from dlmuse_bids.models import find_model, load_trained_model  # noqa: E402
from dlmuse_bids.pipeline import DLMUSEPipeline  # noqa: E402
from dlmuse_bids.settings import InferenceOptions  # noqa: E402
from tests.support.paths import DATA_DIR  # noqa: E402


def full_width_models(cache: Path) -> Path:
    """Build (once) both models at the official width under ``cache``."""
    from tests.support.models import build_models_dir

    if not (cache / "done").exists():
        build_models_dir(cache, base_features=32, max_features=320)
        (cache / "done").touch()
    return cache


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_version() -> str:
    """The commit the benchmark ran (``-dirty`` with uncommitted changes), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_once(models: Path, scan: Path, tta: bool, threads: int, device: str) -> dict:
    # the exact mode (nnU-Net's arithmetic in both networks); compare_engines.py times the others
    opts = InferenceOptions(device=device, num_threads=threads, use_mirroring=tta)
    t0 = time.perf_counter()
    dirs = [models]
    pipe = DLMUSEPipeline(
        load_trained_model(find_model("DLICV", dirs)).predictor(opts),
        load_trained_model(find_model("DLMUSE", dirs)).predictor(opts),
    )
    load_models = time.perf_counter() - t0
    t1 = time.perf_counter()
    img = load_t1w(scan)
    load = time.perf_counter() - t1
    cpu0 = time.process_time()
    result = pipe.run(img)
    cpu = time.process_time() - cpu0
    stages = {"load_models": load_models, "load": load, **result.seconds}
    return {
        "scan": scan.name,
        "shape": list(img.shape),
        "zooms": [float(z) for z in img.header.get_zooms()[:3]],
        "tta": tta,
        "threads": threads,
        "device": device,
        "precision": "fp32 (fp16 accumulation)",
        "step_size": 0.5,
        "seconds": stages,
        "total_s": sum(stages.values()),
        "cpu_s": cpu,
        "peak_rss_gib": peak_rss_gib(),
        "network_grid": {k: list(v.shape_network) for k, v in result.predictions.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", default="sub-otsu_T1w.nii.gz")
    p.add_argument("--tta", choices=("both", "on", "off"), default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", type=Path, default=REPO / ".cache" / "full_width_models")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    models = full_width_models(args.models)
    runs = []
    for tta in {"both": (False, True), "on": (True,), "off": (False,)}[args.tta]:
        runs.append(run_once(models, DATA_DIR / "t1w" / args.scan, tta, args.threads, args.device))
        print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    meta = {
        "machine": cpu_model(),
        "python": sys.version.split()[0],
        "host": host,
    }
    (args.out / f"pipeline_{args.device}_tta-{args.tta}.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=2)
    )
    lines = [
        "| scan | TTA | threads | total s | DLICV s | DLMUSE s | CPU s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["seconds"]
        lines.append(
            f"| {r['scan']} | {'on' if r['tta'] else 'off'} | {r['threads']} | "
            f"{r['total_s']:.0f} | {s['dlicv']:.0f} | {s['dlmuse']:.0f} | "
            f"{r['cpu_s']:.0f} | {r['peak_rss_gib']:.1f} |"
        )
    (args.out / f"pipeline_{args.device}_tta-{args.tta}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
