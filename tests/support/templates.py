"""A TemplateFlow home made from the MNI-space Colin27 scan, for the template check.

Colin27 (``../shared/data/t1w/sub-colin27_T1w.nii.gz``) is one head in MNI space, so it stands in
for ``MNI152NLin2009cAsym``: its 2 mm version is the template T1w, and a head mask made by
thresholding is the template mask (scans aligned to it are masked the same way in the tests).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dlmuse_bids.template import TEMPLATE
from tests.support.paths import DATA_DIR

COLIN = DATA_DIR / "t1w" / "sub-colin27_T1w.nii.gz"


def head_mask(data: np.ndarray) -> np.ndarray:
    """The head: above 15 % of the 99th percentile, closed, filled, largest component."""
    mask = data > 0.15 * np.percentile(data, 99)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=3))
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def block_mean(img: nib.Nifti1Image, factor: int = 2) -> nib.Nifti1Image:
    """Average ``factor``^3 blocks (the affine follows the block centres)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = [s // factor * factor for s in data.shape[:3]]
    data = data[: shape[0], : shape[1], : shape[2]]
    data = data.reshape(shape[0] // factor, factor, shape[1] // factor, factor, -1, factor)
    affine = img.affine @ np.diag([factor, factor, factor, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ np.full(3, (factor - 1) / 2) + img.affine[:3, 3]
    return nib.Nifti1Image(data.mean(axis=(1, 3, 5)), affine)


def make_templateflow_home(root: Path) -> Path:
    """``root`` laid out as a TemplateFlow home holding the template's res-02 T1w and mask."""
    folder = root / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    template = block_mean(nib.load(COLIN))
    mask = head_mask(np.asarray(template.dataobj))
    nib.save(template, folder / f"tpl-{TEMPLATE}_res-02_T1w.nii.gz")
    nib.save(
        nib.Nifti1Image(mask, template.affine),
        folder / f"tpl-{TEMPLATE}_res-02_desc-brain_mask.nii.gz",
    )
    return root
