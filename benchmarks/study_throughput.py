"""A study, not one scan: ``dlmuse-bids participant`` against ``dlmuse run`` on the same T1w.

Eight full-resolution T1w (the five real heads of ``../shared/data/t1w``, three of them twice
under other subjects) in one BIDS dataset, full-width random-weight models (the official
architectures: the time and memory of the real ones). Each command runs in a fresh process,
timed from outside: wall seconds, the peak RSS that ``os.wait4`` reports (the command and the
children it waited for: not nipype's forkserver workers) and the peak of the summed RSS of its
whole process tree, sampled every 0.5 s:

* ``dlmuse run``: the pipeline on the eight files in one process, one after the other, with
  ``--threads`` threads per network;
* ``dlmuse-bids ... participant --nprocs N``: the BIDS App on the dataset (pybids, the nipype
  workflow, derivatives, sidecars, reports and mosaics), ``N`` processes.

The difference is what the workflow machinery adds (goal, issue 17: under 5 %); images per
hour are the study's rate. Both runs use the same mode, so the networks do the same work.
A shared machine's network time varies by several per cent from run to run, so ``--repeats``
alternates the two commands and the table compares the fastest run of each (as ``timeit``).
The BIDS App's sidecars give each image's network seconds: the rest of its wall time is the
workflow's own (start-up, the nodes between the networks, scheduling).

Usage::

    python benchmarks/study_throughput.py [--images 8] [--mode fast] [--nprocs 2]
        [--threads 2] [--repeats 1] [--work DIR] [--out benchmarks/results]

Writes ``results/study_throughput_<mode>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.study_scale import measured  # noqa: E402
from benchmarks.time_pipeline import cpu_model, full_width_models  # noqa: E402
from tests.support.bids import make_dataset, write_scan  # noqa: E402
from tests.support.paths import NICHART_NORMS  # noqa: E402

#: the real heads, in the order the study's subjects get them
HEADS = [
    "sub-otsu_T1w.nii.gz",
    "sub-chris_T1w.nii.gz",
    "sub-colin27_T1w.nii.gz",
    "sub-brainchop_T1w.nii.gz",
    "sub-dep01_T1w.nii.gz",
]


def study_files(n: int) -> list[tuple[str, str]]:
    """``n`` subjects' T1w paths in the dataset, each with the real head it holds."""
    heads = itertools.islice(itertools.cycle(HEADS), n)
    return [(f"sub-{i + 1:02d}/anat/sub-{i + 1:02d}_T1w.nii.gz", h) for i, h in enumerate(heads)]


def make_study(root: Path, n: int) -> list[Path]:
    """The dataset at ``root`` (full resolution) and its T1w files."""
    files = study_files(n)
    make_dataset(root, files=[], participants=False)
    paths = [write_scan(root, rel, head, step=1) for rel, head in files]
    rows = ["participant_id\tage\tsex"]
    rows += [f"sub-{i + 1:02d}\t{60 + i}\t{'MF'[i % 2]}" for i in range(n)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return paths


def descendants_rss(ancestor: int) -> int:
    """Bytes resident in every descendant of process ``ancestor`` (one pass over ``/proc``)."""
    parents, resident = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                pages = int((entry / "statm").read_text().split()[1])
            except OSError:  # ended meanwhile
                continue
            pid = int(entry.name)
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            resident[pid] = pages
    tree, grew = {ancestor}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    tree.discard(ancestor)
    return sum(resident.get(pid, 0) for pid in tree) * os.sysconf("SC_PAGE_SIZE")


def measured_tree(cmd: list[str], env: dict, logs: Path) -> dict:
    """:func:`measured`, with the peak of the summed RSS of the command's process tree
    (nipype's forkserver workers are not children that ``wait4`` reports), sampled every 0.5 s."""
    import threading

    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], descendants_rss(os.getpid()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = measured(cmd, env, logs)
    finally:
        done.set()
        thread.join()
    result["peak_tree_rss_gib"] = round(peak[0] / 2**30, 3)
    return result


def network_seconds(output_dir: Path) -> float:
    """The seconds the BIDS App's networks took, summed over its label maps' sidecars."""
    total = 0.0
    for sidecar in output_dir.rglob("*_dseg.json"):
        total += sum(json.loads(sidecar.read_text())["InferenceSeconds"].values())
    return round(total, 1)


def summary(runs: list[dict]) -> dict:
    """The fastest run of one command, with every run's wall seconds and the highest peaks."""
    best = dict(min(runs, key=lambda run: run["seconds"]))
    best["all_seconds"] = [run["seconds"] for run in runs]
    best["peak_tree_rss_gib"] = max(run["peak_tree_rss_gib"] for run in runs)
    best["peak_rss_gib"] = max(run["peak_rss_gib"] for run in runs)
    return best


def bin_of(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--mode", choices=("default", "exact", "fast"), default="fast")
    p.add_argument("--no-tta", action="store_true", help="both runs without mirroring")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads per network, both runs")
    p.add_argument("--repeats", type=int, default=1, help="runs of each command, alternated")
    p.add_argument("--models", type=Path, default=REPO / ".cache" / "full_width_models")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    models = full_width_models(args.models)
    work = Path(tempfile.mkdtemp(prefix="study-", dir=args.work))
    try:
        bids = work / "bids"
        t1w = make_study(bids, args.images)
        mode = ["--mode", args.mode, *(["--no-tta"] if args.no_tta else [])]
        norms = ["--norms-dir", str(NICHART_NORMS)] if NICHART_NORMS.is_dir() else []
        common = ["--model-dir", str(models), "--device", "cpu", "--offline", *norms, *mode]
        env = {**os.environ, "TEMPLATEFLOW_HOME": str(work / "templateflow")}
        runs: dict[str, list[dict]] = {"dlmuse run": [], "dlmuse-bids participant": []}
        for i in range(args.repeats):
            cmd = [bin_of("dlmuse"), "run", *map(str, t1w), "-o", str(work / f"run{i}")]
            cmd += [*common, "--threads", str(args.threads)]
            runs["dlmuse run"].append(measured_tree(cmd, env, work))
            print(json.dumps(runs["dlmuse run"][-1]), flush=True)
            out = work / f"bids-app{i}"
            cmd = [bin_of("dlmuse-bids"), str(bids), str(out), "participant"]
            cmd += ["-w", str(work / f"work{i}"), "--nprocs", str(args.nprocs)]
            cmd += ["--omp-nthreads", str(args.threads)]
            run = measured_tree([*cmd, *common], env, work)
            runs["dlmuse-bids participant"].append(run)
            for name in runs:
                if runs[name][-1]["rc"] != 0:
                    last = runs[name][-1]
                    raise SystemExit(f"{name} failed (exit {last['rc']}): {last['last_line']}")
            made = sorted(out.rglob("*_dseg.nii.gz"))
            if len(made) != args.images:
                raise SystemExit(f"dlmuse-bids wrote {len(made)} label maps, not {args.images}")
            run["network_seconds"] = network_seconds(out)
            print(json.dumps(run), flush=True)
            shutil.rmtree(work / f"work{i}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = {name: summary(each) for name, each in runs.items()}
    base = runs["dlmuse run"]["seconds"]
    for run in runs.values():
        run["images_per_hour"] = round(3600 * args.images / run["seconds"], 1)
        run["vs_dlmuse_run_pct"] = round(100 * (run["seconds"] - base) / base, 2)
    meta = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "images": args.images,
        "heads": [h for _, h in study_files(args.images)],
        "mode": args.mode,
        "no_tta": args.no_tta,
        "nprocs": args.nprocs,
        "threads_per_network": args.threads,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"study_throughput_{args.mode}{'_no-tta' if args.no_tta else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    lines = [
        f"{args.images} full-resolution T1w ({', '.join(sorted(set(meta['heads'])))}), "
        "full-width random "
        f"weights, `--mode {args.mode}`{' --no-tta' if args.no_tta else ''}, {meta['cpu']} "
        f"({meta['cpus']} CPUs), {args.threads} threads per network, dlmuse-bids with "
        f"`--nprocs {args.nprocs}`. {args.repeats} run(s) of each, alternated, in fresh "
        "processes; the table gives the fastest of each, every run's wall seconds beside it, "
        'and the highest peaks. "In networks": the seconds the sidecars give DLICV and DLMUSE.',
        "",
        "| command | wall s | every run, s | images per hour | vs `dlmuse run` "
        "| in networks, s | peak RSS (wait4) | peak RSS, all its processes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        networks = run.get("network_seconds")
        lines.append(
            f"| `{name}` | {run['seconds']:.0f} | "
            f"{', '.join(f'{t:.0f}' for t in run['all_seconds'])} | "
            f"{run['images_per_hour']:.1f} | {run['vs_dlmuse_run_pct']:+.1f} % | "
            f"{'-' if networks is None else f'{networks:.0f}'} | "
            f"{run['peak_rss_gib']:.2f} GiB | {run['peak_tree_rss_gib']:.2f} GiB |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
