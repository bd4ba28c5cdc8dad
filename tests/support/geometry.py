"""Voxel-order variants of an image, and labels compared in physical space."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def reoriented(img: nib.Nifti1Image, perm, flips) -> nib.Nifti1Image:
    """The same image stored with permuted/flipped voxel axes, affine updated to match."""
    data = np.asarray(img.dataobj).transpose(perm)
    affine = img.affine[:, [*perm, 3]].copy()
    for axis in flips:
        data = np.flip(data, axis)
        flip = np.eye(4)
        flip[axis, axis] = -1
        flip[axis, 3] = data.shape[axis] - 1
        affine = affine @ flip
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, 1)
    out.set_sform(affine, 1)
    return out


def world_labels(path: Path, reference: nib.Nifti1Image) -> np.ndarray:
    """Labels resampled (nearest, exact for axis permutations) onto the reference grid."""
    img = nib.load(path)
    vox = np.linalg.inv(img.affine) @ reference.affine
    ijk = np.indices(reference.shape).reshape(3, -1)
    idx = np.rint(vox[:3, :3] @ ijk + vox[:3, 3:]).astype(int)
    return np.asarray(img.dataobj)[tuple(idx)].reshape(reference.shape)
