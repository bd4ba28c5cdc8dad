"""Affine alignment of the ICV-masked T1w to a template: a check of the header's orientation.

The models were trained on LPS heads with at most 30 degrees of rotation augmentation, so a header
that puts the head the wrong way round gives a confident, wrong segmentation. Aligning the masked
scan to an MNI template tells us the rotation the head needs (large = wrong header) and its
scale (the determinant of the affine: an eTIV-style estimate of the ICV, independent of DLMUSE's
label count).

The registration is deliberately light: 12 affine parameters, normalised cross-correlation, two
coarse grids (8 then 4 mm), started from each of the 24 rotations that map the axes onto each
other (so a header rotated by 90 or 180 degrees is found, not just small tilts), all in torch.
A left-right flip cannot be detected this way (brains are nearly symmetric); front-to-back and
top-to-bottom flips show up as 180-degree rotations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional

#: The template and resolution the check uses (TemplateFlow names).
TEMPLATE = "MNI152NLin2009cAsym"
TEMPLATE_RESOLUTION = 2
#: Grid spacings (mm) of the coarse-to-fine alignment, and Adam steps on each.
GRID_MM = (8.0, 4.0)
STEPS = (60, 80)
#: ITK transforms are in LPS world coordinates; nibabel affines in RAS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class TemplateFiles:
    """A template's T1w and brain mask, as TemplateFlow lays them out."""

    name: str
    t1w: Path
    mask: Path


@dataclass(frozen=True)
class AffineFit:
    """An affine alignment to the template.

    ``matrix`` maps template world coordinates (RAS mm) to T1w world coordinates: the direction
    ITK and ANTs use to resample the T1w into template space.
    """

    matrix: np.ndarray
    rotation_deg: float
    scale: float
    ncc: float
    template_mask_ml: float

    @property
    def etiv_l(self) -> float:
        """The template mask's volume scaled to the subject, in litres."""
        return self.scale * self.template_mask_ml / 1000.0


def find_template(
    home: Path | None, name: str = TEMPLATE, resolution: int = TEMPLATE_RESOLUTION
) -> tuple[TemplateFiles | None, str]:
    """The template's files in a TemplateFlow home, or ``None`` and why it cannot be used.

    Only files already on disk count: TemplateFlow keeps empty placeholders for templates it has
    not downloaded, and nothing is fetched here (a run must not depend on the network).
    """
    if home is None:
        return None, "TEMPLATEFLOW_HOME is not set"
    folder = Path(home) / f"tpl-{name}"
    stem = f"tpl-{name}_res-{resolution:02d}"
    files = TemplateFiles(
        name, folder / f"{stem}_T1w.nii.gz", folder / f"{stem}_desc-brain_mask.nii.gz"
    )
    for path in (files.t1w, files.mask):
        if not path.is_file():
            return None, f"template file {path} not found"
        if path.stat().st_size == 0:
            return None, f"template file {path} is an empty TemplateFlow placeholder (not fetched)"
    return files, ""


def fetch_template(
    home: Path,
    env: Mapping[str, str],
    name: str = TEMPLATE,
    resolution: int = TEMPLATE_RESOLUTION,
) -> TemplateFiles:
    """Download the template's files into a TemplateFlow home (for container builds).

    TemplateFlow reads ``TEMPLATEFLOW_HOME`` when it is first imported, so this runs it in a
    child process with ``env`` (the caller's environment: proxies, CA bundle) and that variable.
    """
    import subprocess
    import sys

    script = (
        "import sys; from templateflow import api; "
        "[api.get(sys.argv[1], resolution=int(sys.argv[2]), suffix=s, desc=d) "
        "for s, d in (('T1w', None), ('mask', 'brain'))]"
    )
    child_env = {**env, "TEMPLATEFLOW_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-c", script, name, str(resolution)], env=child_env, check=True
    )
    files, why = find_template(home, name, resolution)
    if files is None:
        raise RuntimeError(f"TemplateFlow did not provide the template: {why}")
    return files


def _pooled(data: np.ndarray, affine: np.ndarray, spacing_mm: float):
    """Block-average ``data`` to about ``spacing_mm``; returns the tensor and its affine."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factors = [max(1, int(round(spacing_mm / z))) for z in zooms]
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    pooled = functional.avg_pool3d(tensor, kernel_size=factors, stride=factors, ceil_mode=True)
    scale = np.diag([*factors, 1.0])
    scale[:3, 3] = (np.asarray(factors) - 1) / 2.0
    return pooled[0, 0], affine @ scale


def _normalised(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image zeroed outside the mask, scaled so that the mask's mean intensity is 1."""
    inside = mask > 0
    values = np.where(inside, np.asarray(data, dtype=np.float32), 0.0)
    mean = float(values[inside].mean()) if inside.any() else 0.0
    return values / mean if mean > 0 else values


def _centre_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask > 0).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def axis_rotations() -> np.ndarray:
    """The 24 proper rotations that map the coordinate axes onto each other, identity first."""
    found = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            rot = np.zeros((3, 3))
            rot[range(3), perm] = signs
            if np.linalg.det(rot) > 0:
                found.append(rot)
    found.sort(key=lambda r: -np.trace(r))
    return np.stack(found)


def rotation_angle_deg(linear: np.ndarray) -> float:
    """The angle of the rotation nearest to ``linear`` (its polar decomposition)."""
    u, _, vt = np.linalg.svd(linear)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a mirror: the angle of its proper part
        rot = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    return float(math.degrees(math.acos(cos)))


class _Alignment:
    """Moving image, template points and the maths of one coarse grid."""

    def __init__(self, moving, moving_affine, template, template_affine, spacing_mm):
        self.volume, affine = _pooled(moving, moving_affine, spacing_mm)
        fixed, fixed_affine = _pooled(template, template_affine, spacing_mm)
        keep = fixed.numpy() > 0
        # the template's box around its mask, one coarse voxel wider: edges drive the scale
        grown = np.argwhere(keep)
        lo = np.maximum(grown.min(0) - 1, 0)
        hi = np.minimum(grown.max(0) + 2, keep.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        ijk = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"))
        ijk = ijk.reshape(3, -1).T.astype(np.float64)
        self.points = torch.from_numpy(ijk @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]).float()
        values = fixed[box].reshape(-1)
        self.centred = values - values.mean()  # the template side of the NCC, fixed per grid
        self.to_index = torch.from_numpy(np.linalg.inv(affine)).float()
        self.shape = torch.tensor(self.volume.shape, dtype=torch.float32)

    def ncc(self, linear: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """NCC of each candidate (B,3,3), (B,3): world point y -> linear @ y + offset."""
        world = torch.einsum("bij,nj->bni", linear, self.points) + offset[:, None, :]
        index = world @ self.to_index[:3, :3].T + self.to_index[:3, 3]
        grid = (2.0 * index / (self.shape - 1) - 1.0).flip(-1)  # grid_sample wants (z, y, x)
        batch = linear.shape[0]
        sampled = functional.grid_sample(
            self.volume.expand(batch, 1, *self.volume.shape),
            grid.view(batch, 1, 1, -1, 3),
            align_corners=True,
            padding_mode="zeros",
        ).view(batch, -1)
        a = sampled - sampled.mean(1, keepdim=True)
        b = self.centred
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm() + 1e-6)


def _linear(base: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """base @ rotation(p[0:3]) @ (scales(p[3:6]) + shears(p[6:9])), batched.

    A rotation vector rather than a free matrix lets the optimiser turn the head without
    passing through squashed, sheared matrices on the way.
    """
    skew = torch.zeros(p.shape[0], 3, 3)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -p[:, 2], p[:, 1], -p[:, 0]
    rotation = torch.linalg.matrix_exp(skew - skew.transpose(1, 2))
    stretch = torch.diag_embed(torch.exp(p[:, 3:6]))
    stretch[:, 0, 1], stretch[:, 0, 2], stretch[:, 1, 2] = p[:, 6], p[:, 7], p[:, 8]
    return base @ rotation @ stretch


def _optimise(alignment, base, centre_t, centre_m, steps, params=None):
    """Adam on (B,12) parameters; returns them, the NCC of each candidate, and the transform."""
    if params is None:
        params = torch.zeros(base.shape[0], 12)
    params = params.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=0.02)

    def transform(p):
        linear = _linear(base, p)
        offset = centre_m + 10.0 * p[:, 9:] - (linear @ centre_t[:, None])[..., 0]
        return linear, offset

    for _ in range(steps):
        optimiser.zero_grad()
        loss = -alignment.ncc(*transform(params)).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        linear, offset = transform(params)
        return params.detach(), alignment.ncc(linear, offset), linear, offset


def register_to_template(
    image: nib.Nifti1Image,
    mask: nib.Nifti1Image,
    template: nib.Nifti1Image,
    template_mask: nib.Nifti1Image,
) -> AffineFit:
    """Align the masked T1w to the masked template (12 parameters, coarse to fine).

    ``mask`` must share ``image``'s grid, ``template_mask`` ``template``'s. Deterministic: no
    random initialisation, and torch's CPU kernels used here are deterministic.
    """
    with torch.inference_mode(False), torch.enable_grad():
        moving_mask = np.asanyarray(mask.dataobj) > 0
        moving = _normalised(np.asanyarray(image.dataobj), moving_mask)
        fixed_mask = np.asanyarray(template_mask.dataobj) > 0.5
        fixed = _normalised(np.asanyarray(template.dataobj), fixed_mask)
        moving_ml = float(moving_mask.sum()) * _voxel_ml(image.affine)
        fixed_ml = float(fixed_mask.sum()) * _voxel_ml(template.affine)
        if moving_ml == 0 or fixed_ml == 0:
            raise ValueError("an empty mask cannot be aligned")
        centre_m = torch.from_numpy(_centre_mm(moving_mask, image.affine)).float()
        centre_t = torch.from_numpy(_centre_mm(fixed_mask, template.affine)).float()
        start_scale = (moving_ml / fixed_ml) ** (1.0 / 3.0)
        base = torch.from_numpy(axis_rotations() * start_scale).float()
        params = None
        for level, (spacing, steps) in enumerate(zip(GRID_MM, STEPS, strict=True)):
            alignment = _Alignment(moving, image.affine, fixed, template.affine, spacing)
            params, scores, linear, offset = _optimise(
                alignment, base, centre_t, centre_m, steps, params
            )
            if level == 0:  # keep the best starting rotation only
                best = int(torch.argmax(scores))
                base, params = base[best : best + 1], params[best : best + 1]
        matrix = np.eye(4)
        matrix[:3, :3] = linear[0].double().numpy()
        matrix[:3, 3] = offset[0].double().numpy()
    return AffineFit(
        matrix=matrix,
        rotation_deg=rotation_angle_deg(matrix[:3, :3]),
        scale=float(np.linalg.det(matrix[:3, :3])),
        ncc=float(scores[0]),
        template_mask_ml=fixed_ml,
    )


def _voxel_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def itk_affine_text(matrix: np.ndarray) -> str:
    """``matrix`` (template RAS -> T1w RAS) as an ITK transform file (LPS, centre 0)."""
    lps = _RAS_TO_LPS @ matrix @ _RAS_TO_LPS
    values = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    return (
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in values)}\n"
        "FixedParameters: 0 0 0\n"
    )


def read_itk_affine(text: str) -> np.ndarray:
    """The RAS matrix of an ITK ``AffineTransform_double_3_3`` file (inverse of the writer)."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if fields.get("Transform", "").strip() not in (
        "AffineTransform_double_3_3",
        "MatrixOffsetTransformBase_double_3_3",
    ):
        raise ValueError("not a 3-D ITK affine transform")
    params = np.array(fields["Parameters"].split(), dtype=float)
    centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = params[:9].reshape(3, 3)
    lps[:3, 3] = params[9:12] + centre - lps[:3, :3] @ centre
    return _RAS_TO_LPS @ lps @ _RAS_TO_LPS
