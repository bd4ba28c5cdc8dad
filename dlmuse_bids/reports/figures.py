"""Figures of the reports, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import write_bytes_atomic
from ..labels import dseg_table

#: Slices per plane in a mosaic, spread over the ICV mask's extent.
SLICES_PER_PLANE = 6
_PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _pyplot():
    """pyplot on the Agg backend, whatever MPLBACKEND says (reports are drawn headless).

    matplotlib's cache folder (``MPLCONFIGDIR``) is the command line's business:
    :func:`dlmuse_bids.cli.common.third_party_environment`.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    return pyplot


def label_colours() -> np.ndarray:
    """RGBA per label value (0..max index) from the dseg table; background transparent."""
    table = dseg_table()
    rgba = np.zeros((int(table["index"].max()) + 1, 4))
    for index, colour in zip(table["index"], table["color"], strict=True):
        if int(index) == 0 or not isinstance(colour, str) or not colour.startswith("#"):
            continue
        rgba[int(index)] = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0]
    return rgba


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Data in RAS voxel order (flips/permutations only) and its voxel sizes."""
    ras = nib.as_closest_canonical(img)
    return np.asanyarray(ras.dataobj), tuple(float(z) for z in ras.header.get_zooms()[:3])


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin`` voxels (the whole image if it is empty)."""
    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    found = np.argwhere(mask)
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _slice_positions(mask: np.ndarray, axis: int, n: int) -> list[int]:
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=others))
    if present.size == 0:
        present = np.arange(mask.shape[axis])
    lo, hi = present[0], present[-1]
    return [int(round(p)) for p in np.linspace(lo, hi, n + 2)[1:-1]]


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice, transposed so that up is superior/anterior and left is the subject's right."""
    return np.take(volume, index, axis=axis).T


def mosaic(
    t1w: nib.Nifti1Image,
    labels: nib.Nifti1Image,
    icv_mask: nib.Nifti1Image,
    out_png: str | os.PathLike[str],
    *,
    title: str = "",
    slices: int = SLICES_PER_PLANE,
) -> Path:
    """T1w with the DLMUSE labels and the ICV contour: ``slices`` slices in each of 3 planes.

    Images are shown in RAS order in the neurological convention (the subject's left on the left
    of axial and coronal slices; anterior on the right of sagittal ones), slices spread over the
    ICV mask, voxels at their true aspect ratio.
    """
    plt = _pyplot()
    image, zooms = _canonical(t1w)
    label_data, _ = _canonical(labels)
    mask, _ = _canonical(icv_mask)
    image = np.asarray(image, dtype=np.float32)
    box = _box(mask > 0, margin=8)
    image, label_data, mask = image[box], np.asarray(label_data)[box], np.asarray(mask)[box]
    inside = image[mask > 0] if (mask > 0).any() else image.ravel()
    vmin, vmax = np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0)
    colours = label_colours()
    label_data = np.clip(np.asarray(label_data, dtype=np.int64), 0, len(colours) - 1)

    fig, axes = plt.subplots(3, slices, figsize=(2.0 * slices, 6.6), facecolor="black")
    for row, (plane, axis) in enumerate(_PLANES):
        keep = [a for a in range(3) if a != axis]
        aspect = zooms[keep[1]] / zooms[keep[0]]
        for col, index in enumerate(_slice_positions(mask > 0, axis, slices)):
            ax = axes[row, col]
            ax.imshow(
                _plane(image, axis, index),
                cmap="gray",
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
            overlay = colours[_plane(label_data, axis, index)]
            overlay[..., 3] *= 0.45
            ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
            m = _plane(mask, axis, index) > 0
            if m.any() and not m.all():
                ax.contour(m.astype(float), levels=[0.5], colors="yellow", linewidths=0.7)
            ax.set_axis_off()
            if col == 0:
                ax.set_title(plane, color="white", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, color="white", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.02, hspace=0.08)
    return _save(fig, plt, out_png)


def _save(fig, plt, out_png) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
    write_bytes_atomic(out_png, buffer.getvalue())
    return Path(out_png)


def scatter_panels(
    panels: Sequence[dict], out_png: str | os.PathLike[str], *, columns: int = 3
) -> Path:
    """Small scatter/strip plots, one per panel.

    Each panel: ``title``, ``x`` (numbers or None for a strip plot), ``y``, ``flagged`` (bools),
    ``xlabel``, ``ylabel``.
    """
    plt = _pyplot()
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 3.2 * rows), squeeze=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same data give the same picture
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        y = np.asarray(panel["y"], dtype=float)
        flagged = np.asarray(panel.get("flagged", np.zeros(len(y), bool)), dtype=bool)
        x = panel.get("x")
        x = rng.uniform(-0.2, 0.2, len(y)) if x is None else np.asarray(x, dtype=float)
        ax.scatter(x[~flagged], y[~flagged], s=14, color="#1f77b4", label="ok")
        if flagged.any():
            ax.scatter(x[flagged], y[flagged], s=22, color="#d62728", marker="x", label="flagged")
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        if panel.get("x") is None:
            ax.set_xticks([])
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, plt, out_png)


def centile_band_panels(
    panels: Sequence[dict], out_png: str | os.PathLike[str], *, columns: int = 4
) -> Path:
    """Normative centile bands against age, with images as points, one panel per ROI.

    Each panel: ``title``; ``ages`` (n) and ``bands`` (n x 5: the 5th, 25th, 50th, 75th, 95th
    centiles); ``points``: dicts of ``age``, ``value``, ``subject``, ``flagged`` (a subject's
    points are joined by a line, in age order); ``ylabel``.
    """
    plt = _pyplot()
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        ages, bands = np.asarray(panel["ages"], float), np.asarray(panel["bands"], float)
        ax.fill_between(ages, bands[:, 0], bands[:, 4], color="#c6dbef", label="5-95th")
        ax.fill_between(ages, bands[:, 1], bands[:, 3], color="#9ecae1", label="25-75th")
        ax.plot(ages, bands[:, 2], color="#3182bd", lw=1, label="50th")
        by_subject: dict[str, list[dict]] = {}
        for point in panel["points"]:
            by_subject.setdefault(point["subject"], []).append(point)
        for points in by_subject.values():
            points = sorted(points, key=lambda p: p["age"])
            if len(points) > 1:
                ax.plot([p["age"] for p in points], [p["value"] for p in points], color="#555",
                        lw=0.8)  # fmt: skip
            for p in points:
                style = ("x", "#d62728", 24) if p["flagged"] else ("o", "#222", 12)
                ax.scatter([p["age"]], [p["value"]], marker=style[0], color=style[1], s=style[2],
                           zorder=3)  # fmt: skip
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("age", fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_axis_off()
    if panels:
        axes.ravel()[0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _save(fig, plt, out_png)
