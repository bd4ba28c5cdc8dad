"""Discovery, planning and the group level on a synthetic study of 10,000 subjects.

Discovery needs no image content: every T1w is an empty file, in the BIDS layout of a study
(``sub-NNNNN/anat/sub-NNNNN_T1w.nii.gz``, with a ``participants.tsv``). Each phase runs in a
fresh process, its wall time and peak RSS measured from outside (``os.wait4``):

* ``list-cold``: ``dlmuse-bids ... participant --list-participants``, pybids indexing anew;
* ``list-db-build`` / ``list-db-reuse``: the same with ``--bids-database-dir``, first building
  the index, then reusing it;
* ``plan``: what ``participant`` does before the first node runs, phase by phase (index,
  select, plan by provenance, lock every image, build the first batch's nipype workflow and
  nipype's graph expansion of it), and the building of every batch's workflow (the runner
  builds each one when the one before it is done), with the tests' tiny random-weight models;
* ``group``: ``dlmuse-bids ... group`` over 10,000 finished images (synthetic volume tables and
  sidecars of the real format).

Usage::

    python benchmarks/study_scale.py [--subjects 10000] [--work DIR] [--out benchmarks/results]

Writes ``results/study_scale.json`` and ``.md``. Goals (issue 19): listing under 60 s cold and
under 10 s with the database reused, under 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.time_pipeline import cpu_model  # noqa: E402


def make_study(root: Path, n: int) -> None:
    """``n`` subjects with one empty T1w each, and a participants.tsv."""
    root.mkdir(parents=True)
    description = {"Name": "synthetic study", "BIDSVersion": "1.10.0", "Authors": ["a"]}
    (root / "dataset_description.json").write_text(json.dumps(description))
    rows = ["participant_id\tage\tsex"]
    for i in range(n):
        label = f"{i:05d}"
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{label}_T1w.nii.gz").touch()
        rows.append(f"sub-{label}\t{60 + i % 30}\t{'MF'[i % 2]}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def finish_outputs(root: Path, out: Path) -> None:
    """Every image's volume table and sidecar, as a finished participant run leaves them."""
    import numpy as np

    from dlmuse_bids.bids import Provenance, output_paths, write_dataset_files
    from dlmuse_bids.labels import roi_volume_table, single_roi_ids

    out.mkdir(parents=True, exist_ok=True)
    write_dataset_files(out, root, "0.1.0", None)
    rng = np.random.default_rng(0)
    labels = rng.choice([0, *single_roi_ids()], size=(40, 40, 40))
    table = roi_volume_table(labels, (1.0, 1.0, 1.0)).to_csv(
        sep="\t", index=False, na_rep="n/a", lineterminator="\n"
    )
    sidecar = json.dumps(Provenance("0.1.0", {}, {}).metadata())
    for t1w in sorted(root.glob("sub-*/anat/*_T1w.nii.gz")):
        paths = output_paths(t1w, out)
        paths["volumes"].parent.mkdir(parents=True, exist_ok=True)
        paths["volumes"].write_text(table)
        paths["dseg_json"].write_text(sidecar)


def measured(cmd: list[str], env: dict, logs: Path) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS (GiB, from ``wait4``), exit code, output size."""
    import tempfile

    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=logs) as out, tempfile.TemporaryFile(dir=logs) as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().decode(errors="replace")
    lines = stderr.strip().splitlines()
    return {
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
        "rc": proc.returncode,
        "stdout_lines": len(stdout.splitlines()),
        "last_line": lines[-1] if lines else "",
    }


def plan_phases(root: Path, out: Path, models: Path) -> dict:
    """In this process: each step of ``participant`` before its first node, timed."""
    import resource
    from copy import deepcopy

    from nipype.pipeline.engine.utils import generate_expanded_graph

    from dlmuse_bids.bids import output_paths, outputs_current
    from dlmuse_bids.execution import workflow_batches
    from dlmuse_bids.locks import ImageLocks
    from dlmuse_bids.runner import bids_app, core
    from dlmuse_bids.settings import BIDSAppSettings, ModelSources
    from dlmuse_bids.workflows import init_participant_wf

    settings = BIDSAppSettings(root, out, "participant", models=ModelSources((models,)))
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    t1w = bids_app.select_t1w(settings)
    seconds["index_and_select"] = time.perf_counter() - t
    infos = bids_app._check_models(core.model_folders(settings.models, print))
    prov = core.provenance(settings.version, settings.inference, infos)
    t = time.perf_counter()
    plan = core.plan_images(
        t1w,
        lambda p: output_paths(p, out)["dseg"],
        lambda p: outputs_current(p, out, prov),
        False,
        "",
    )
    seconds["plan_by_provenance"] = time.perf_counter() - t
    t = time.perf_counter()
    with ImageLocks(out, print) as locks:
        plan = core.claim_images(
            plan,
            locks,
            lambda p: output_paths(p, out)["dseg"].name,
            lambda p: outputs_current(p, out, prov),
            False,
        )
        seconds["lock_every_image"] = time.perf_counter() - t
        batches = workflow_batches(plan.todo, settings.plugin, settings.nprocs)
        build = expand = 0.0
        nodes = 0
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            wf = init_participant_wf(
                t1w_files=batch,
                bids_dir=root,
                output_dir=out,
                models=infos,
                inference=settings.inference,
                provenance=prov,
            )
            build += time.perf_counter() - t
            t = time.perf_counter()
            # what Workflow.run does before it hands the graph to a plugin (nipype's own steps)
            flat = wf._create_flat_graph()
            wf._set_needed_outputs(flat)
            nodes += generate_expanded_graph(deepcopy(flat)).number_of_nodes()
            expand += time.perf_counter() - t
            if i == 0:  # the runner builds each batch when the one before it is done
                seconds["first_batch_workflow"] = build + expand
        seconds["all_batches_build"] = build
        seconds["all_batches_nipype_expansion"] = expand
        first = seconds.pop("first_batch_workflow", 0.0)
    before_first = sum(v for k, v in seconds.items() if not k.startswith("all_")) + first
    return {
        "images": len(plan.todo),
        "batches": len(batches),
        "nodes": nodes,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "seconds_to_first_node": round(before_first, 2),
        "total_seconds": round(sum(seconds.values()), 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dlmuse-study-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one phase in a child
    args = parser.parse_args()
    root, out, models = args.work / "bids", args.work / "out", args.work / "models"
    if args.phase == "plan":
        print(json.dumps(plan_phases(root, args.work / "plan-out", models)))
        return
    if args.work.exists():
        shutil.rmtree(args.work)
    t = time.perf_counter()
    make_study(root, args.subjects)
    made = time.perf_counter() - t
    from tests.conftest import shrink_plans
    from tests.support.models import build_models_dir
    from tests.support.paths import DLICV_DATASET, DLMUSE_DATASET

    build_models_dir(models)
    shrink_plans(models, 2.0, {DLICV_DATASET: [96, 128, 96], DLMUSE_DATASET: [80, 96, 80]})
    exe = str(Path(sys.executable).with_name("dlmuse-bids"))
    env = {**os.environ, "DLMUSE_OFFLINE": "1"}
    base = [exe, str(root), str(out), "participant", "--list-participants"]
    db = args.work / "db"
    results: dict = {"cpu": cpu_model(), "subjects": args.subjects, "make_study_s": round(made, 1)}
    logs = args.work / "logs"
    results["list-cold"] = measured(base, env, logs)
    results["list-db-build"] = measured([*base, "--bids-database-dir", str(db)], env, logs)
    results["list-db-reuse"] = measured([*base, "--bids-database-dir", str(db)], env, logs)
    child = [sys.executable, __file__, "--work", str(args.work), "--phase", "plan"]
    plan = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
    results["plan"] = json.loads(plan.stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    finish_outputs(root, out)
    results["finish_outputs_s"] = round(time.perf_counter() - t, 1)
    results["group"] = measured([exe, str(root), str(out), "group"], env, logs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "study_scale.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    rows = [
        f"# Study scale: {r['subjects']} subjects ({r['cpu']}, `benchmarks/study_scale.py`)",
        "",
        "| phase | wall | peak RSS | note |",
        "|---|---|---|---|",
    ]
    for key in ("list-cold", "list-db-build", "list-db-reuse", "group"):
        m = r[key]
        note = f"rc {m['rc']}; {m['stdout_lines']} lines out; {m['last_line'][:80]}"
        rows.append(f"| {key} | {m['seconds']} s | {m['peak_rss_gib']} GiB | {note} |")
    p = r["plan"]
    steps = ", ".join(f"{k} {v} s" for k, v in p["seconds"].items())
    rows.append(
        f"| plan ({p['images']} images, {p['batches']} workflows, {p['nodes']} nipype nodes) | "
        f"{p['seconds_to_first_node']} s to the first node, {p['total_seconds']} s in all | "
        f"{p['peak_rss_gib']} GiB | {steps} |"
    )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
