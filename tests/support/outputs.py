"""Comparing two runs' derivative datasets: same files, same voxels, same tables."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

#: sidecar fields that differ between any two runs of the same version on the same data
RUN_FACTS = ("InferenceSeconds",)


def derivative_files(out: Path, subjects=None) -> dict[str, Path]:
    """The dataset files and every output of ``subjects`` (default: all) by relative path,
    reports (HTML) and crash logs left out."""
    wanted = None if subjects is None else {f"sub-{s}" for s in subjects}
    found = {}
    for path in sorted(out.rglob("*")):
        parts = path.relative_to(out).parts
        if not path.is_file() or path.suffix == ".html" or parts[0] == "logs":
            continue
        if len(parts) == 1 or wanted is None or parts[0] in wanted:
            found["/".join(parts)] = path
    return found


def without_run_facts(meta: dict) -> dict:
    """A sidecar less what differs between any two runs (timings)."""
    return {k: v for k, v in meta.items() if k not in RUN_FACTS}


def without_run_place(description: dict) -> dict:
    """``dataset_description.json`` less where it ran: ``GeneratedBy[].Container`` and the
    input's path in ``SourceDatasets``/``DatasetLinks`` (``/data`` in a container)."""
    generated = [
        {k: v for k, v in entry.items() if k != "Container"}
        for entry in description.get("GeneratedBy", [])
    ]
    sources = [
        {k: v for k, v in entry.items() if k != "URL"}
        for entry in description.get("SourceDatasets", [])
    ]
    links = {k: "<input>" for k in description.get("DatasetLinks", {})}
    return {
        **description,
        "GeneratedBy": generated,
        "SourceDatasets": sources,
        "DatasetLinks": links,
    }


def assert_same_outputs(expected: Path, actual: Path, subjects=None) -> None:
    """The same files; images equal voxel for voxel on the same grid; sidecars equal but for
    timings; the dataset description equal but for where it ran; every other file (tables,
    transforms, figures) equal byte for byte."""
    want, got = derivative_files(expected, subjects), derivative_files(actual, subjects)
    assert sorted(got) == sorted(want)
    for rel, path in want.items():
        other = got[rel]
        if rel.endswith(".nii.gz"):
            a, b = nib.load(path), nib.load(other)
            assert np.array_equal(a.affine, b.affine), rel
            assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), rel
        elif rel == "dataset_description.json":
            a, b = (json.loads(p.read_text()) for p in (path, other))
            assert without_run_place(a) == without_run_place(b), rel
        elif rel.endswith(".json"):
            a, b = (json.loads(p.read_text()) for p in (path, other))
            assert without_run_facts(a) == without_run_facts(b), rel
        else:
            assert path.read_bytes() == other.read_bytes(), rel
