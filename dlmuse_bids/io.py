"""Load and validate one T1w NIfTI image, and write NIfTI outputs safely (:mod:`.atomic`).

Part of the core: only numpy and nibabel are used here. Every refusal of an input is an
:class:`InputImageError` whose message is one line, ``"<path>: <reason>"``, so that it can go
straight into a log, a report or a BIDS App's exit summary.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes
from nibabel.spatialimages import HeaderDataError
from numpy.typing import DTypeLike

from .atomic import write_bytes_atomic
from .gunzip import GZIP_MAGIC, GzipError, gunzip_bounded

LOGGER = logging.getLogger(__name__)

#: Fewest voxels along each spatial axis of an accepted T1w image.
MIN_VOXELS_PER_AXIS = 32
#: Largest accepted voxel size (mm); coarser images are not structural T1w scans.
MAX_VOXEL_SIZE_MM = 5.0
#: sform and qform further apart than this (per matrix element, mm) count as disagreeing.
SQFORM_ATOL_MM = 1e-3
#: Most bytes a gzipped file's header may claim (vox_offset and voxel data): 4 GiB is a 1024³
#: float32 volume, far beyond a T1w scan. The limit bounds decompression; a plain .nii file is
#: read whole anyway, and refused when it is shorter than its header claims.
MAX_IMAGE_BYTES = 4 << 30
#: Most bytes a gzip stream may hold beyond what its header claims; they are decompressed (to
#: check the stream's end and CRC) but not kept.
MAX_TRAILING_BYTES = 64 << 20

#: A NIfTI file's extension, in any case (``.NII.GZ`` is seen on scanners' exports).
NIFTI_EXTENSION = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_GZIP_LEVEL = 6
# Decompressed bytes enough to tell a NIfTI header, or a format of _OTHER_FORMATS, or text.
_GZIP_HEAD = 4096
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Header fields that make up the voxel-to-world geometry (pixdim[0] is the qform's qfac).
_GEOMETRY_FIELDS = (
    "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "qform_code",
    "srow_x", "srow_y", "srow_z", "sform_code", "xyzt_units"
)  # fmt: skip
_PAIR_REASON = "header of a .hdr/.img pair; a single-file .nii or .nii.gz is needed"
# Formats people pass in place of a NIfTI: (byte offset, signature, what it is).
_OTHER_FORMATS = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file, e.g. MINC-2"),
    (0, b"CDF", "a NetCDF file, e.g. MINC-1"),
    (128, b"DICM", "a DICOM file"),
    (0, b"\x00\x00\x00\x01", "a FreeSurfer MGH/MGZ volume"),
)


#: Where git-annex (DataLad, OpenNeuro) keeps file contents; a dataset's files link into it.
ANNEX_OBJECTS = ".git/annex/objects/"
#: What an unlocked git-annex file holds in place of content not fetched (a pointer file).
ANNEX_POINTER = b"/annex/objects/"


class InputImageError(ValueError):
    """An input image that cannot be used: ``path`` and a short, plain ``reason``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)  # both in args, so the error pickles
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{_printable(os.fspath(self.path))}: {' '.join(self.reason.split())}"


class _Refusal(Exception):  # noqa: N818 - an internal signal, never seen by callers
    """Internal: a reason to refuse the input; :func:`load_t1w` adds the path."""


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """A file's name without its ``.nii``/``.nii.gz`` extension (in any case)."""
    return NIFTI_EXTENSION.sub("", Path(path).name)


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot take outputs (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".dlmuse-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"output directory not writable ({exc.strerror or exc})"
    return None


def load_t1w(path: str | os.PathLike[str], *, volume: int | None = None) -> nib.Nifti1Image:
    """Load one T1w NIfTI file, check it thoroughly, and return it as a 3-D float32 image.

    The whole file is read (and decompressed) up front, so truncated or corrupt files fail
    here rather than half-way through a pipeline. A gzipped file is decompressed only as far as
    its header says the image goes (at most :data:`MAX_IMAGE_BYTES`); the stream's remainder,
    at most :data:`MAX_TRAILING_BYTES`, is checked but not kept.

    Parameters
    ----------
    path : str or os.PathLike
        A single-file NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``).
    volume : int, optional
        Index of the volume to use from a 4-D file with several volumes (needed for one); a
        3-D or single-volume file is used whole whatever it says (``--t1w-volume`` applies to
        the files that need it).

    Returns
    -------
    nibabel.Nifti1Image
        Float32 data with scl_slope/scl_inter applied; the source's sform/qform matrices and
        codes, and the affine ``get_best_affine`` picks. ``img.extra`` records the source's
        path, on-disk dtype, byte order, format and shape.

    Raises
    ------
    InputImageError
        If the file is missing, unreadable, not a usable NIfTI, or not usable as a T1w volume.
    """
    source = Path(path)
    try:
        img = _load_checked(source, volume)
    except _Refusal as exc:
        raise InputImageError(source, str(exc)) from exc.__cause__
    LOGGER.debug("Loaded %s: %s", source, describe_image(img))
    return img


def describe_image(img: nib.Nifti1Image) -> dict[str, Any]:
    """Summarise an image's geometry for logs and JSON sidecars (JSON-serialisable values).

    Returns ``shape``, ``zooms`` (mm), ``dtype`` (on disk, from ``img.extra`` when
    :func:`load_t1w` made the image), ``orientation`` (``aff2axcodes``), ``affine_source``
    (``"sform"``, ``"qform"`` or ``"fallback"``), ``sform_code``, ``qform_code`` and
    ``sform_qform_mismatch`` (both set but further apart than :data:`SQFORM_ATOL_MM`).
    """
    hdr = img.header
    sform, sform_code = hdr.get_sform(coded=True)
    qform, qform_code = hdr.get_qform(coded=True)
    both = sform is not None and qform is not None
    mismatch = both and not np.allclose(sform, qform, rtol=0.0, atol=SQFORM_ATOL_MM)
    extra = img.extra or {}
    return {
        "shape": [int(n) for n in img.shape],
        "zooms": [float(z) for z in hdr.get_zooms()[:3]],
        "dtype": str(extra.get("source_dtype", img.get_data_dtype().name)),
        "orientation": [str(code) for code in aff2axcodes(img.affine)],
        "affine_source": _affine_source(hdr),
        "sform_code": int(sform_code),
        "qform_code": int(qform_code),
        "sform_qform_mismatch": bool(mismatch),
    }


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike[str]) -> None:
    """Write ``img`` so that ``path`` is only ever absent, the old file, or the complete new one.

    The bytes go to a hidden ``.<name>.<random>.tmp`` in the same directory, are fsynced, and
    the file is renamed over ``path``; on any error the temporary file is removed and the error
    re-raised. ``path`` must end in ``.nii`` or ``.nii.gz`` (gzip with a zero timestamp, so the
    same image always gives the same bytes) and its directory must exist.
    """
    final = Path(path)
    if not isinstance(img, nib.Nifti1Image):
        raise TypeError(f"expected a nibabel Nifti1Image, got {type(img).__name__}")
    if final.name.endswith(".nii.gz"):
        compress = True
    elif final.name.endswith(".nii"):
        compress = False
    else:
        raise ValueError(f"{final}: output name must end in .nii or .nii.gz")
    payload = img.to_bytes()
    if compress:
        payload = gzip.compress(payload, compresslevel=_GZIP_LEVEL, mtime=0)
    write_bytes_atomic(final, payload)
    LOGGER.debug("Wrote %s (%d bytes)", final, len(payload))


def make_label_image(
    labels: np.ndarray, reference: nib.Nifti1Image, dtype: DTypeLike = np.uint8
) -> nib.Nifti1Image:
    """Wrap a label array in an image with the reference image's exact geometry.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels (or integral floats / booleans), same shape as ``reference``.
    reference : nibabel.Nifti1Image
        Image whose shape, affine, sform/qform (matrices and codes) and xyzt units are copied.
    dtype : numpy dtype, optional
        Integer dtype of the stored, unscaled labels (intent ``label``); every label must fit.

    Raises
    ------
    ValueError
        If the shapes differ, ``dtype`` is not an integer type, or a label does not fit it.
    """
    target = np.dtype(dtype)
    if target.kind not in "iu":
        raise ValueError(f"label dtype must be an integer type, got {target}")
    labels = np.asanyarray(labels)
    if labels.shape != tuple(reference.shape):
        raise ValueError(
            f"label array shape {labels.shape} does not match reference shape {reference.shape}"
        )
    _check_label_values(labels, target)
    hdr = _header_like(_written_header(reference), labels.shape, target)
    hdr.set_intent("label")
    data = labels.astype(target, copy=False)
    return nib.Nifti1Image(data, hdr.get_best_affine(), header=hdr)


# --- loading -------------------------------------------------------------------------------


def _load_checked(path: Path, volume: int | None) -> nib.Nifti1Image:
    raw = _read_file(path)
    compressed = raw[:2] == GZIP_MAGIC
    if compressed:
        raw = _gunzip(raw)
    if compressed != path.name.endswith(".gz") or not path.name.endswith((".nii", ".nii.gz")):
        LOGGER.warning("%s: name does not match its content (gzip: %s)", path, compressed)
    klass = _nifti_class(raw)
    try:
        src = klass.from_bytes(raw)
        # nibabel silently "fixes" zero or negative pixdims on load; judge the file's own.
        as_stored = klass.header_class(raw[: src.header.sizeof_hdr], check=False)
        zooms = np.asarray(as_stored.get_zooms()[:3], dtype=np.float64)
        hdr = src.header
        shape = tuple(int(n) for n in hdr.get_data_shape())
        disk_dtype = hdr.get_data_dtype()
    except (HeaderDataError, ImageFileError, ValueError, TypeError, OverflowError) as exc:
        raise _Refusal(f"invalid NIfTI header ({exc})") from exc
    index = _check_shape(shape, volume)
    if disk_dtype.kind not in "biuf":
        raise _Refusal(f"unsupported voxel data type {disk_dtype}; a scalar T1w image is needed")
    offset, header_end = int(src.dataobj.offset), klass.header_class.single_vox_offset
    if offset < header_end:
        # nibabel reads voxels from byte 0 when vox_offset is 0, the NIfTI C library from the
        # header's end: which bytes are voxels is anyone's guess.
        raise _Refusal(f"voxel data offset {offset} is inside the header (at least {header_end})")
    need = math.prod(shape) * disk_dtype.itemsize  # Python ints: no overflow however large
    have = len(raw) - offset
    if have < need:
        where = "after decompression " if compressed else ""
        raise _Refusal(f"voxel data truncated {where}(need {need} bytes, found {max(have, 0)})")
    form = _affine_source(hdr)
    affine = _checked_affine(hdr, form, zooms)
    if form == "fallback":
        LOGGER.warning("%s: neither sform nor qform is set; orientation is a guess", path)
    proxy = src.dataobj[..., index] if len(shape) == 4 else src.dataobj
    with np.errstate(over="ignore"):  # float64 beyond float32 range: reported just below
        data = np.asarray(proxy, dtype=np.float32)
    _check_values(data, disk_dtype)

    out_hdr = _header_like(hdr, data.shape, np.dtype(np.float32))
    extra = {
        "source_path": str(path),
        "source_format": "NIfTI-2" if klass is nib.Nifti2Image else "NIfTI-1",
        "source_dtype": disk_dtype.name,
        "source_byteorder": "big" if hdr.endianness == ">" else "little",
        "source_shape": list(shape),
        "volume": index if len(shape) == 4 else None,
    }
    out = nib.Nifti1Image(data, out_hdr.get_best_affine(), header=out_hdr, extra=extra)
    if not np.allclose(out.affine, affine, rtol=0.0, atol=1e-4):
        # Only NIfTI-2 (float64 fields) can lose precision in the float32 NIfTI-1 header.
        LOGGER.warning("%s: affine rounded when converting to NIfTI-1", path)
    return out


def _read_file(path: Path) -> bytes:
    if not os.path.lexists(path):
        raise _Refusal("file does not exist")
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        if ANNEX_OBJECTS in Path(target).as_posix():
            raise _Refusal(f"content not downloaded (git-annex): run `datalad get {path}`")
        raise _Refusal(f"broken symbolic link (target {target!r} does not exist)")
    if path.is_dir():
        raise _Refusal("is a directory, not a NIfTI file")
    try:
        raw = path.read_bytes()
    except PermissionError as exc:
        raise _Refusal("permission denied (file is not readable)") from exc
    except OSError as exc:
        raise _Refusal(f"cannot read file ({exc.strerror or exc})") from exc
    if not raw:
        raise _Refusal("file is empty (0 bytes)")
    if raw.startswith(ANNEX_POINTER) and len(raw) < 1024:  # an unlocked file, not fetched
        raise _Refusal(f"content not downloaded (git-annex): run `datalad get {path}`")
    return raw


def _gunzip(raw: bytes) -> bytes:
    """The decompressed file, as far as its header says the image goes (see :mod:`.gunzip`)."""
    try:
        # a head without a NIfTI header or size comes back alone: _load_checked says why
        return gunzip_bounded(raw, _GZIP_HEAD, _claimed_bytes, MAX_IMAGE_BYTES, MAX_TRAILING_BYTES)
    except GzipError as exc:
        raise _Refusal(str(exc)) from exc


def _claimed_bytes(head: bytes) -> int | None:
    """Bytes up to the end of the voxel data, as a NIfTI header claims; None without one."""
    try:
        klass = _nifti_class(head)
    except _Refusal:
        return None
    hdr = klass.header_class(head[: klass.header_class.sizeof_hdr], check=False)
    try:
        voxels = math.prod(max(n, 0) for n in hdr.get_data_shape())  # Python ints: exact
        return max(hdr.get_data_offset(), 0) + voxels * hdr.get_data_dtype().itemsize
    except (HeaderDataError, KeyError, ValueError, OverflowError):
        return None


def _nifti_class(raw: bytes) -> type[nib.Nifti1Image]:
    """Identify the format from the first bytes; refuse anything but single-file NIfTI."""
    head = raw[:4].ljust(4, b"\0")
    order = next((o for o in ("little", "big") if int.from_bytes(head, o) in (348, 540)), "")
    size = int.from_bytes(head, order) if order else 0
    if size == 348:
        if len(raw) < 348:
            raise _Refusal(f"truncated NIfTI-1 header ({len(raw)} of 352 bytes)")
        if raw[344:347] == b"ni1":
            raise _Refusal(_PAIR_REASON)
        if raw[344:347] != b"n+1":
            raise _Refusal("Analyze 7.5 header without NIfTI magic; convert it to NIfTI first")
        if len(raw) < 352:
            raise _Refusal(f"truncated NIfTI-1 header ({len(raw)} of 352 bytes)")
        klass, ndim = nib.Nifti1Image, int.from_bytes(raw[40:42], order, signed=True)
    elif size == 540 and raw[4:7] in (b"n+2", b"ni2"):
        if raw[4:7] == b"ni2":
            raise _Refusal(_PAIR_REASON)
        if len(raw) < 544:
            raise _Refusal(f"truncated NIfTI-2 header ({len(raw)} of 544 bytes)")
        klass, ndim = nib.Nifti2Image, int.from_bytes(raw[16:24], order, signed=True)
    else:
        for offset, signature, name in _OTHER_FORMATS:
            if raw[offset : offset + len(signature)] == signature:
                raise _Refusal(f"not a NIfTI file (looks like {name})")
        if _looks_like_text(raw[:4096]):
            raise _Refusal("not a NIfTI file (looks like a text file)")
        raise _Refusal("not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    # nibabel would take a bad dim[0] as a byte-order hint and misread the whole header.
    if not 1 <= ndim <= 7:
        raise _Refusal(f"invalid NIfTI header (dim[0] is {ndim}, must be 1 to 7)")
    return klass


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a multi-byte character cut at the end
    return True


def _check_shape(shape: tuple[int, ...], volume: int | None) -> int:
    """Check dimensionality and size; return the index of the volume to use."""
    text = "x".join(str(n) for n in shape) or "none"
    ndim = len(shape)
    if ndim < 3 or ndim > 4:
        raise _Refusal(f"image is {ndim}-D (shape {text}); a 3-D T1w volume is needed")
    n_vol = shape[3] if ndim == 4 else 1
    if n_vol < 1:
        raise _Refusal(f"image is 4-D with no volumes (shape {text})")
    if volume is None and n_vol > 1:
        raise _Refusal(
            f"image is 4-D with {n_vol} volumes (shape {text}); "
            f"a single 3-D T1w volume is needed (choose one with volume=0..{n_vol - 1})"
        )
    index = 0 if volume is None or n_vol == 1 else volume
    if not 0 <= index < n_vol:
        raise _Refusal(f"volume {index} requested but the image has {n_vol} (shape {text})")
    for axis, n in enumerate(shape[:3]):
        if n < MIN_VOXELS_PER_AXIS:
            raise _Refusal(
                f"image too small: {n} voxels along axis {axis} (shape {text}); "
                f"at least {MIN_VOXELS_PER_AXIS} are needed"
            )
    return index


def _affine_source(hdr: nib.Nifti1Header) -> str:
    """Name the transform ``get_best_affine`` uses."""
    if hdr["sform_code"] != 0:
        return "sform"
    return "qform" if hdr["qform_code"] != 0 else "fallback"


def _checked_affine(hdr: nib.Nifti1Header, form: str, zooms: np.ndarray) -> np.ndarray:
    text = "x".join(f"{z:g}" for z in zooms)
    if not np.all(np.isfinite(zooms)):
        raise _Refusal(f"voxel size is not finite (pixdim {text})")
    if np.any(zooms <= 0):
        raise _Refusal(f"voxel size must be positive (pixdim {text} mm)")
    if np.any(zooms > MAX_VOXEL_SIZE_MM):
        raise _Refusal(f"voxel size {text} mm is above the {MAX_VOXEL_SIZE_MM:g} mm limit")
    affine = _form_matrix(hdr, form)
    if form == "sform" and hdr["qform_code"] != 0:
        _form_matrix(hdr, "qform")  # unused here, but kept with the image for other readers
    axes = affine[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    # |det| over the product of column lengths is 1 for orthogonal axes and 0 for degenerate
    # ones, whatever the voxel size.
    if np.any(sizes == 0) or abs(np.linalg.det(axes)) < 1e-3 * np.prod(sizes):
        raise _Refusal(f"{form} affine is singular (voxel axes are degenerate)")
    if np.any(sizes > MAX_VOXEL_SIZE_MM):
        text = "x".join(f"{s:g}" for s in sizes)
        raise _Refusal(
            f"voxel size {text} mm from the {form} is above the {MAX_VOXEL_SIZE_MM:g} mm limit"
        )
    if not np.allclose(sizes, zooms, rtol=0.01):
        LOGGER.warning("%s voxel sizes %s mm differ from pixdim %s", form, sizes, zooms)
    return affine


def _form_matrix(hdr: nib.Nifti1Header, form: str) -> np.ndarray:
    try:
        affine = hdr.get_qform() if form == "qform" else hdr.get_best_affine()
    except (HeaderDataError, ValueError) as exc:
        raise _Refusal(f"invalid {form} affine ({exc})") from exc
    if not np.all(np.isfinite(affine)):
        raise _Refusal(f"{form} affine has non-finite values")
    if np.any(np.abs(affine) > _FLOAT32_MAX):  # a NIfTI-2 value the NIfTI-1 output cannot hold
        raise _Refusal(f"{form} affine has values beyond float32 range")
    return affine


def _check_values(data: np.ndarray, disk_dtype: np.dtype) -> None:
    if not np.all(np.isfinite(data)):
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        beyond = " or beyond float32 range" if n_inf and disk_dtype.itemsize > 4 else ""
        raise _Refusal(f"image has {n_nan} NaN and {n_inf} infinite{beyond} voxel values")
    low, high = float(data.min()), float(data.max())
    if low == high:
        if high == 0:
            raise _Refusal("all voxels are zero")
        raise _Refusal(f"all voxels have the same value ({high:g}); the image has no contrast")


# --- writing ------------------------------------------------------------------------------


def _written_header(reference: nib.Nifti1Image) -> nib.Nifti1Header:
    """The header nibabel would write for ``reference`` (its affine wins over a stale header)."""
    # Building an image runs nibabel's own harmonisation (update_header); no data is read.
    klass = type(reference) if isinstance(reference, nib.Nifti1Image) else nib.Nifti1Image
    return klass(reference.dataobj, reference.affine, reference.header).header


def _header_like(
    src: nib.Nifti1Header, shape: tuple[int, ...], dtype: np.dtype
) -> nib.Nifti1Header:
    """A fresh unscaled NIfTI-1 header with ``src``'s geometry fields copied verbatim."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["pixdim"][:4] = src["pixdim"][:4]
    for name in _GEOMETRY_FIELDS:
        hdr[name] = src[name]
    hdr.set_slope_inter(None, None)
    return hdr


def _check_label_values(labels: np.ndarray, target: np.dtype) -> None:
    if labels.size == 0 or labels.dtype.kind == "b":
        return
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"label array must hold integers, got {labels.dtype}")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise ValueError("label array has non-integral or non-finite values")
    info = np.iinfo(target)
    low, high = labels.min(), labels.max()
    if low < info.min or high > info.max:
        raise ValueError(f"labels span {low:g}..{high:g}, which does not fit {target}")


def _printable(text: str) -> str:
    """Escape control characters (a newline in a file name) so messages stay on one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
