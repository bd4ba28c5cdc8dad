"""Small BIDS datasets built from the real scans in ``../shared/data/t1w``.

Scans are subsampled to 2 mm (every other voxel, affine updated) so a whole dataset segments in
seconds with the tiny test models, which also work at 2 mm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.support.paths import DATA_DIR

#: (relative path under the dataset, source scan) of the standard test dataset:
#: several subjects, two sessions, two runs, an acq- variant, .nii and .nii.gz.
STANDARD_T1W = [
    ("sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz", "sub-otsu_T1w.nii.gz"),
    ("sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz", "sub-colin27_T1w.nii.gz"),
    ("sub-01/ses-2/anat/sub-01_ses-2_acq-fast_T1w.nii", "sub-chris_T1w.nii.gz"),
    ("sub-02/anat/sub-02_T1w.nii.gz", "sub-brainchop_T1w.nii.gz"),
    ("sub-03/anat/sub-03_T1w.nii.gz", "sub-dep01_T1w.nii.gz"),
]


def subsampled(scan: str, step: int = 2) -> nib.Nifti1Image:
    """A real scan with every ``step``-th voxel on each axis (same dtype, affine updated)."""
    img = nib.load(DATA_DIR / "t1w" / scan)
    return img.slicer[::step, ::step, ::step]


def write_scan(root: Path, rel: str, scan: str, step: int = 2) -> Path:
    """Write a subsampled real scan into a dataset."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img = subsampled(scan, step)
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    nib.save(out, path)
    return path


def make_dataset(
    root: Path, files: list[tuple[str, str]] | None = None, participants: bool = True
) -> Path:
    """A BIDS dataset at ``root`` holding ``files`` (default :data:`STANDARD_T1W`)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "dlmuse-bids test", "BIDSVersion": "1.10.0", "Authors": ["a", "b"]})
    )
    (root / "README").write_text("Test dataset built from public scans.\n")
    chosen = STANDARD_T1W if files is None else files
    written = [write_scan(root, rel, scan) for rel, scan in chosen]
    subjects = sorted({p.relative_to(root).parts[0] for p in written})
    if participants:
        rows = ["participant_id\tage\tsex"] + [
            f"{s}\t{60 + i}\t{'F' if i % 2 else 'M'}" for i, s in enumerate(subjects)
        ]
        (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def run_app(bids_dir, out, *extra, models, level="participant", env=None) -> int:
    """``dlmuse-bids`` in this process; the input dataset must come out byte for byte as it was."""
    from dlmuse_bids.cli.bids_app import main

    argv = [str(bids_dir), str(out), level, "--model-dir", str(models), *map(str, extra)]
    inside = Path(out).absolute().is_relative_to(Path(bids_dir).absolute())
    skip = (
        (Path(out).absolute().relative_to(Path(bids_dir).absolute()).as_posix(),) if inside else ()
    )
    before = tree_digest(Path(bids_dir), skip) if Path(bids_dir).is_dir() else None
    # no network here: nothing is fetched on first use (the fetch tests use loopback servers)
    code = main(argv, env={"DLMUSE_OFFLINE": "1", **(env or {})})
    if before is not None:
        assert tree_digest(Path(bids_dir), skip) == before, f"{bids_dir} was modified"
    return code


def tree_digest(root: Path, exclude: Sequence[str] = ()) -> dict[str, str]:
    """Every entry under ``root`` (itself included) -> a digest of what it is and holds.

    Files by sha256 of their bytes and their mode, symlinks by target (followed or not), folders
    by mode; compare two calls to prove that a run wrote nothing into ``root``. ``exclude``:
    folders (relative POSIX paths) left out with all they hold, e.g. an output folder inside.
    """
    import hashlib
    import os

    digest = {}
    for path in [root, *sorted(root.rglob("*"))]:
        key = path.relative_to(root).as_posix()
        if any(key == e or key.startswith(f"{e}/") for e in exclude):
            continue
        st = path.lstat()
        if path.is_symlink():
            digest[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            digest[key] = f"dir {st.st_mode:o}"
        else:
            with open(path, "rb") as f:  # not Path.read_bytes, which tests may patch
                content = hashlib.file_digest(f, "sha256").hexdigest()
            digest[key] = f"file {st.st_mode:o} {content}"
    return digest
