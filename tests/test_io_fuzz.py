"""Seeded property test of :func:`dlmuse_bids.io.load_t1w` on thousands of damaged NIfTI files.

Each case starts from a small valid NIfTI-1 or NIfTI-2 file written byte for byte, then edits
header fields at their offsets (dim, pixdim, datatype, scaling, qform/sform, vox_offset, magic,
or any field at random), the voxel bytes, or the file as a whole (truncation, byte flips, gzip
damage, ``.hdr``/``.img`` pairs). Whatever the bytes, ``load_t1w`` must either return an image
that the pipeline's network-free maths (LPS reorientation, mask and crop, paste, back to native,
ROI volumes) accept, or raise an :class:`InputImageError` whose message is one line starting with
the path. Any other exception, or a case slower than ``CASE_SECONDS``, is a failure.

Set ``DLMUSE_FUZZ_SUMMARY`` to a file name to get the run's counts and refusal reasons as JSON.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import resource
import struct
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.nifti1 import data_type_codes
from nibabel.quaternions import quat2mat

from dlmuse_bids.io import MIN_VOXELS_PER_AXIS, InputImageError, load_t1w
from dlmuse_bids.labels import class_to_muse_lut, roi_volume_table, roi_volumes
from dlmuse_bids.pipeline import (
    from_reference_orientation,
    lps_zooms,
    mask_and_crop,
    paste_labels,
    to_native,
    to_reference_orientation,
)

SEED = 19
N_CASES = 5000
#: Every 3rd plain .nii case is loaded again gzipped: the verdict must not change.
TWIN_EVERY = 3
#: Generous bound on one load (plus its downstream maths) on a slow, busy core.
CASE_SECONDS = 5.0
#: Most a refused too-large file may raise the peak of traced (or resident) memory.
MEMORY_SLACK = 32 << 20
HEADERS = {1: nib.Nifti1Header, 2: nib.Nifti2Header}
#: Every datatype code of the NIfTI standard, then codes that are none of them (0: "none",
#: 255: "all" are names in nibabel's table, not voxel types).
VALID_CODES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304)
INVALID_CODES = (0, 3, 5, 7, 9, 100, 255, 4096, -1, 32767)
#: Voxel types a T1w scan is stored in, drawn more often so that many files are accepted.
COMMON_CODES = (2, 4, 4, 16, 16, 64, 256, 512)
#: Bytes per voxel of the standard codes nibabel has no numpy type for (binary: 1 bit, but a
#: byte each here; the loader refuses the type whatever the length).
NOMINAL_ITEMSIZE = {1: 1, 1536: 16, 2048: 32}
GZIP_MAGIC = b"\x1f\x8b"
LUT = class_to_muse_lut()
# A number in a message, not a digit of a name (T1w, float32, complex64, NIfTI-1); those of a
# shape or of voxel sizes (40x40x40, 1.5xnanx-inf) are numbers, one at a time.
_NUMBER = re.compile(
    r"(?<![-0-9A-Za-wyz])(?<!\d\.)(?<![A-MO-Za-z]x)"
    r"(?:-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|-?(?:nan|inf)(?![a-wyz]))"
)


def pick(rng: np.random.Generator, options: tuple | list) -> object:
    """One of ``options``, keeping its Python type (``rng.choice`` would make numpy scalars)."""
    return options[int(rng.integers(len(options)))]


# --- building files byte for byte -----------------------------------------------------------


@dataclass
class NiftiBytes:
    """A single-file NIfTI under construction: header, 4 extension bytes, voxel bytes."""

    version: int
    endian: str
    buf: bytearray

    @property
    def header_size(self) -> int:
        return HEADERS[self.version].template_dtype.itemsize

    def put(self, name: str, value: object, index: int = 0) -> None:
        """Store element ``index`` of header field ``name`` in the file's byte order, cast as C
        would (out-of-range integers wrap, floats beyond float32 become infinite)."""
        base, offset = HEADERS[self.version].template_dtype.fields[name][:2]
        item = (base.subdtype[0] if base.subdtype else base).newbyteorder(self.endian)
        if item.kind == "S":
            raw = bytes(value)[: item.itemsize].ljust(item.itemsize, b"\0")  # type: ignore[call-overload]
        else:
            with np.errstate(all="ignore"):
                wide = np.array(value, dtype=np.float64 if item.kind == "f" else np.int64)
                raw = wide.astype(item).tobytes()
        start = offset + index * item.itemsize
        self.buf[start : start + item.itemsize] = raw

    def field_span(self, name: str) -> tuple[int, int]:
        base, offset = HEADERS[self.version].template_dtype.fields[name][:2]
        return offset, offset + base.itemsize


def test_field_offsets_are_the_standard_ones() -> None:
    """The builders take offsets from nibabel's header layout: check it against the standard."""
    for version, fields in {
        1: {"dim": 40, "datatype": 70, "pixdim": 76, "vox_offset": 108, "scl_slope": 112,
            "qform_code": 252, "quatern_b": 256, "srow_x": 280, "magic": 344},
        2: {"datatype": 12, "dim": 16, "pixdim": 104, "vox_offset": 168, "scl_slope": 176,
            "qform_code": 344, "quatern_b": 352, "srow_x": 400, "magic": 4},
    }.items():  # fmt: skip
        layout = HEADERS[version].template_dtype
        assert layout.itemsize == (348 if version == 1 else 540)
        assert {name: layout.fields[name][1] for name in fields} == fields


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """A valid voxel-to-world matrix: any axis order and flips, often oblique, 0.5-2.5 mm."""
    axes = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
    if rng.random() < 0.5:
        quaternion = rng.normal(size=4)
        axes = quat2mat(quaternion / np.linalg.norm(quaternion)) @ axes
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(rng.uniform(0.5, 2.5, size=3))
    affine[:3, 3] = rng.uniform(-150.0, 150.0, size=3)
    return affine


def random_voxels(rng: np.random.Generator, n: int, code: int, endian: str) -> bytes:
    dtype = data_type_codes.dtype[code]
    if dtype.fields is not None or dtype.itemsize == 0:  # RGB, RGBA, or no numpy type
        return rng.bytes(n * (dtype.itemsize or NOMINAL_ITEMSIZE[code]))
    if dtype.kind == "c":
        values = rng.normal(size=n) + 1j * rng.normal(size=n)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(max(info.min, -1000), min(info.max, 1000), size=n, endpoint=True)
    else:
        values = rng.uniform(0.0, 1000.0, size=n)
    return values.astype(dtype.newbyteorder(endian)).tobytes()


def base_file(rng: np.random.Generator) -> tuple[NiftiBytes, str]:
    """A valid single-file NIfTI of 32-40 voxels per axis (a few 4-D), and its description."""
    version = int(pick(rng, (1, 2)))
    endian = "<" if rng.random() < 0.8 else ">"
    low = MIN_VOXELS_PER_AXIS
    shape = tuple(int(n) for n in rng.integers(low, low + 9, size=3))
    if rng.random() < 0.1:
        shape = (*shape, int(rng.integers(1, 3)))
    code = int(pick(rng, COMMON_CODES if rng.random() < 0.7 else VALID_CODES))
    dtype = data_type_codes.dtype[code]
    has_numpy_type = dtype.itemsize > 0
    hdr = HEADERS[version](endianness=endian)
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype if has_numpy_type else np.float32)
    affine = random_affine(rng)
    hdr.set_qform(affine, code=int(pick(rng, (0, 1, 1, 2, 4))))
    sform = affine if rng.random() < 0.7 else random_affine(rng)
    hdr.set_sform(sform, code=int(pick(rng, (0, 1, 2, 4))))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_offset(hdr.single_vox_offset)
    voxels = random_voxels(rng, math.prod(shape), code, endian)
    nifti = NiftiBytes(version, endian, bytearray(hdr.binaryblock + bytes(4) + voxels))
    if not has_numpy_type:
        nifti.put("datatype", code)
        nifti.put("bitpix", 8 * NOMINAL_ITEMSIZE[code])
    order = " big-endian" if endian == ">" else ""
    text = "x".join(map(str, shape))
    return nifti, f"NIfTI-{version}{order} {data_type_codes.label[code]} {text}"


# --- header edits: each changes one thing and says what -------------------------------------

Edit = Callable[[np.random.Generator, NiftiBytes], str]
NASTY_FLOATS = (0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e30, 1e-30, 1e-45, 1e38, 5.0)


def edit_dim(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    big = nifti.version == 2
    sizes = [0, 1, -1, -40, 2, 31, 32, 33, 40, 32767, -32768]
    sizes += [2**20, 2**31 - 1, 2**40, 2**62] if big else []
    kind = int(rng.integers(5))
    if kind == 0:
        ndim = int(
            pick(rng, [-1, 0, 1, 2, 4, 5, 6, 7, 8, 9, 255, -32768, *([2**40] if big else [])])
        )
        nifti.put("dim", ndim, 0)
        return f"dim[0]={ndim}"
    if kind == 1:
        axis, n = int(rng.integers(1, 8)), int(pick(rng, sizes))
        nifti.put("dim", n, axis)
        return f"dim[{axis}]={n}"
    if kind == 2:  # ~10^12 voxels or far more, in a file of a few hundred kB
        dims = pick(rng, [(10_000, 10_000, 10_000), (32767, 32767, 32767)] + (
            [(2**20, 2**20, 2**10), (2**40, 2**40, 2**40), (2**31 - 1,) * 3] if big else []
        ))  # fmt: skip
        nifti.put("dim", 3, 0)
        for axis, n in enumerate(dims, start=1):  # type: ignore[arg-type]
            nifti.put("dim", n, axis)
        return f"dim={dims}"
    if kind == 3:
        volumes = int(pick(rng, [0, 1, 2, 3, -1, 10_000]))
        nifti.put("dim", 4, 0)
        nifti.put("dim", volumes, 4)
        return f"4-D with dim[4]={volumes}"
    dims = [int(pick(rng, sizes)) for _ in range(7)]
    for axis, n in enumerate(dims, start=1):
        nifti.put("dim", n, axis)
    return f"dim[1:]={dims}"


def edit_pixdim(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    index = int(pick(rng, (0, 1, 2, 3, 1, 2, 3, 4, 5, 7)))
    values = [*NASTY_FLOATS, 5.000001, 6.0, 0.01, float(rng.uniform(0.2, 3.0))]
    values += [1e300, 1e-300] if nifti.version == 2 else []
    value = float(pick(rng, values))
    nifti.put("pixdim", value, index)
    return f"pixdim[{index}]={value:g}"


def edit_datatype(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    code = int(pick(rng, VALID_CODES + INVALID_CODES))
    nifti.put("datatype", code)
    if rng.random() < 0.3:
        bitpix = int(pick(rng, (0, 7, 8, 16, 32, -8, 128, 256)))
        nifti.put("bitpix", bitpix)
        return f"datatype={code} bitpix={bitpix} (voxel bytes unchanged)"
    return f"datatype={code} (voxel bytes unchanged)"


def edit_scaling(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    values = [*NASTY_FLOATS, 1.0, 2.5, 1e-38, *([1e300] if nifti.version == 2 else [])]
    slope, inter = float(pick(rng, values)), float(pick(rng, values))
    nifti.put("scl_slope", slope)
    nifti.put("scl_inter", inter)
    return f"scl_slope={slope:g} scl_inter={inter:g}"


def edit_form_codes(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    codes = (-1, 0, 1, 2, 3, 4, 5, 255, 32767)
    qcode, scode = int(pick(rng, codes)), int(pick(rng, codes))
    nifti.put("qform_code", qcode)
    nifti.put("sform_code", scode)
    return f"qform_code={qcode} sform_code={scode}"


def edit_sform(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    huge = 1e300 if nifti.version == 2 else 1e38
    matrix = random_affine(rng)[:3]
    kind = str(pick(rng, ["zero", "equal-rows", "zero-row", "nan", "inf", "huge", "huge-offset",
                          "tiny", "random", "coarse"]))  # fmt: skip
    i, j = int(rng.integers(3)), int(rng.integers(4))
    if kind == "zero":
        matrix[:, :3] = 0.0
    elif kind == "equal-rows":
        matrix[1] = matrix[0]
    elif kind == "zero-row":
        matrix[i, :3] = 0.0
    elif kind in ("nan", "inf"):
        matrix[i, j] = math.nan if kind == "nan" else -math.inf
    elif kind == "huge":
        matrix[i, j % 3] = huge
    elif kind == "huge-offset":
        matrix[i, 3] = huge
    elif kind == "tiny":
        matrix[:, :3] *= 1e-30
    elif kind == "random":
        matrix[:, :3] = rng.normal(scale=2.0, size=(3, 3))
    else:
        matrix[:, :3] *= 6.0
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        for col in range(4):
            nifti.put(name, matrix[row, col], col)
    code = int(pick(rng, (1, 2, 3, 4, 4, 0)))
    nifti.put("sform_code", code)
    return f"sform {kind} (code {code})"


def edit_qform(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    if rng.random() < 0.8:
        nifti.put("sform_code", 0)  # so that the qform is the transform used
    nifti.put("qform_code", int(pick(rng, (1, 1, 2, 4))))
    kind = str(pick(rng, ["non-unit", "nan", "inf", "unit-bcd", "offset", "qfac"]))
    if kind == "non-unit":  # |b,c,d| > 1 often: no rotation has such a quaternion
        bcd = rng.uniform(-1.5, 1.5, size=3)
    elif kind in ("nan", "inf"):
        bcd = rng.uniform(-0.5, 0.5, size=3)
        bcd[int(rng.integers(3))] = math.nan if kind == "nan" else math.inf
    elif kind == "unit-bcd":
        bcd = np.eye(3)[int(rng.integers(3))]
    else:
        bcd = rng.uniform(-0.5, 0.5, size=3)
    for name, value in zip(("quatern_b", "quatern_c", "quatern_d"), bcd, strict=True):
        nifti.put(name, value)
    if kind == "offset":
        nifti.put("qoffset_x", float(pick(rng, (math.nan, math.inf, 1e38, -1e38))))
    if kind == "qfac":
        nifti.put("pixdim", float(pick(rng, (0.0, 2.0, -2.0, math.nan))), 0)
    return f"qform {kind} b,c,d={np.round(bcd, 3).tolist()}"


def edit_vox_offset(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    size, end = nifti.header_size, len(nifti.buf)
    values: list[float] = [0, 1, 100, size - 1, size, size + 3, size + 5, size + 16, end, end - 2]
    values += [end + 1, 1e10, -1, -size]
    values += [2**62, -(2**62)] if nifti.version == 2 else [math.nan, math.inf, size + 4.5]
    value = pick(rng, values)
    nifti.put("vox_offset", value)
    return f"vox_offset={value}"


def edit_magic(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    magic = bytes(pick(rng, [b"ni1\0", b"n+1\0", b"ni2\0", b"n+2\0", b"n+1", b"xyz\0", bytes(4)]))
    nifti.put("magic", magic)
    return f"magic={magic!r}"


def edit_sizeof_hdr(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    value = int(pick(rng, (0, 1, 348, 540, -348, 0x5C010000, 0x1C020000, 2**31 - 1)))
    nifti.put("sizeof_hdr", value)
    return f"sizeof_hdr={value}"


def edit_any_field(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    name = str(pick(rng, HEADERS[nifti.version].template_dtype.names))
    start, stop = nifti.field_span(name)
    nifti.buf[start:stop] = rng.bytes(stop - start)
    return f"random bytes in {name}"


def edit_extension(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    """Insert one NIfTI extension (often with a wrong size) before the voxel data."""
    at = nifti.header_size
    esize = int(pick(rng, (0, 8, 16, 17, 32, -16, 2**31 - 1, 64)))
    body = rng.bytes(int(pick(rng, (8, 24, 56))))
    block = struct.pack(nifti.endian + "ii", esize, int(rng.integers(-5, 50))) + body
    nifti.buf[at : at + 4] = b"\x01\0\0\0"
    nifti.buf[at + 4 : at + 4] = block
    if rng.random() < 0.7:
        nifti.put("vox_offset", at + 4 + len(block))
    return f"extension esize={esize} of {len(block)} bytes"


def edit_voxels(rng: np.random.Generator, nifti: NiftiBytes) -> str:
    start = nifti.header_size + 4
    n = len(nifti.buf) - start
    kind = str(pick(rng, ["zeros", "ones", "0xff", "random", "constant"]))
    if kind == "zeros":
        nifti.buf[start:] = bytes(n)
    elif kind == "0xff":  # NaN in every float type
        nifti.buf[start:] = b"\xff" * n
    elif kind == "random":  # NaN and infinity here and there in float types
        nifti.buf[start:] = rng.bytes(n)
    elif kind == "ones":
        nifti.buf[start:] = b"\x01" * n
    else:
        nifti.buf[start:] = bytes(nifti.buf[start : start + 8]) * (n // 8) + bytes(n % 8)
    return f"voxel bytes {kind}"


HEADER_EDITS: tuple[Edit, ...] = (
    edit_dim, edit_dim, edit_pixdim, edit_pixdim, edit_datatype, edit_scaling, edit_form_codes,
    edit_sform, edit_sform, edit_qform, edit_qform, edit_vox_offset, edit_vox_offset, edit_magic,
    edit_sizeof_hdr, edit_any_field, edit_any_field, edit_extension, edit_voxels,
)  # fmt: skip


# --- whole-file damage and containers ---------------------------------------------------------


def truncate(rng: np.random.Generator, content: bytes, header_size: int) -> tuple[bytes, str]:
    cut = int(pick(rng, [int(rng.integers(0, header_size + 4)), len(content) - 1,
                         int(rng.integers(header_size + 4, len(content)))]))  # fmt: skip
    return content[:cut], f"truncated to {cut} bytes"


def flip_bytes(rng: np.random.Generator, content: bytes, header_size: int) -> tuple[bytes, str]:
    stop = header_size + 4 if rng.random() < 0.5 else len(content)
    mutable = bytearray(content)
    where = rng.integers(0, min(stop, len(content)), size=int(rng.integers(1, 21)))
    for i in where:
        mutable[i] ^= int(rng.integers(1, 256))
    return bytes(mutable), f"{len(where)} bytes flipped below {stop}"


def gzip_member(content: bytes, level: int) -> bytes:
    return gzip.compress(content, compresslevel=level, mtime=0)


def gzipped(rng: np.random.Generator, content: bytes) -> tuple[bytes, str]:
    """The file gzipped, intact most of the time, else damaged in one of many ways."""
    level = int(rng.integers(1, 10))
    packed = gzip_member(content, level)
    kind = str(pick(rng, ["intact"] * 8 + [
        "truncated", "flipped", "garbage-after-header", "junk-after", "zero-padding",
        "two-members", "extra-inside", "named-member", "empty-member",
    ]))  # fmt: skip
    if kind == "truncated":
        packed = packed[: int(rng.integers(0, len(packed)))]
    elif kind == "flipped":
        mutable = bytearray(packed)
        for i in rng.integers(10, len(packed), size=int(rng.integers(1, 5))):
            mutable[i] ^= int(rng.integers(1, 256))
        packed = bytes(mutable)
    elif kind == "garbage-after-header":
        packed = packed[:10] + rng.bytes(int(rng.integers(1, 4000)))
    elif kind == "junk-after":
        packed += rng.bytes(int(rng.integers(1, 100)))
    elif kind == "zero-padding":
        packed += bytes(int(rng.integers(1, 600)))
    elif kind == "two-members":
        cut = int(rng.integers(0, len(content) + 1))
        packed = gzip_member(content[:cut], level) + gzip_member(content[cut:], level)
    elif kind == "extra-inside":  # trailing data within the stream, beyond the image
        packed = gzip_member(content + rng.bytes(int(rng.integers(1, 70_000))), level)
    elif kind == "named-member":  # FNAME set in the gzip header
        buffer = io.BytesIO()
        with gzip.GzipFile("t1w.nii", "wb", level, buffer, mtime=0) as stream:
            stream.write(content)
        packed = buffer.getvalue()
    elif kind == "empty-member":
        packed = gzip_member(b"", level) + packed
    return packed, f"gzip level {level} {kind}"


@dataclass
class Case:
    """Files to write (name -> bytes), the one to load, and how it was made."""

    files: dict[str, bytes]
    target: str
    description: str
    volume: int | None = None
    twin_of: str | None = None  # the plain case this gzipped twin repeats


def as_pair(rng: np.random.Generator, nifti: NiftiBytes, text: str) -> Case:
    """The image as a .hdr/.img pair (magic ni1/ni2, vox_offset 0); load either file."""
    size = nifti.header_size
    if rng.random() < 0.8:
        nifti.put("magic", b"ni1\0" if nifti.version == 1 else b"ni2\0")
        nifti.put("vox_offset", 0)
    files = {"t1w.hdr": bytes(nifti.buf[:size]), "t1w.img": bytes(nifti.buf[size + 4 :])}
    target = "t1w.hdr" if rng.random() < 0.8 else "t1w.img"
    return Case(files, target, f"{text} | .hdr/.img pair, loading {target}")


def not_nifti(rng: np.random.Generator) -> Case:
    kind = str(pick(rng, ["random", "text", "tiny", "gzip-random", "gzip-empty"]))
    if kind == "random":
        content = rng.bytes(int(rng.integers(1, 3000)))
    elif kind == "text":
        content = b"subject,age\n" + b"01,42\n" * int(rng.integers(1, 500))
    elif kind == "tiny":
        content = rng.bytes(int(rng.integers(1, 8)))
    elif kind == "gzip-random":
        content = gzip_member(rng.bytes(int(rng.integers(1, 3000))), 6)
    else:
        content = gzip_member(b"", 6)
    return Case({"t1w.nii.gz": content}, "t1w.nii.gz", f"not a NIfTI: {kind}")


def make_case(rng: np.random.Generator) -> Case:
    roll = rng.random()
    if roll < 0.03:
        return not_nifti(rng)
    nifti, text = base_file(rng)
    parts = [text]
    if roll > 0.15:  # else left valid
        for _ in range(int(pick(rng, (1, 1, 1, 2, 3)))):
            parts.append(pick(rng, HEADER_EDITS)(rng, nifti))  # type: ignore[operator]
    if rng.random() < 0.05:
        return as_pair(rng, nifti, " | ".join(parts))
    content = bytes(nifti.buf)
    damage = rng.random()
    if damage < 0.08:
        content, what = truncate(rng, content, nifti.header_size)
        parts.append(what)
    elif damage < 0.16:
        content, what = flip_bytes(rng, content, nifti.header_size)
        parts.append(what)
    elif damage < 0.18:
        content += rng.bytes(int(rng.integers(1, 5000)))
        parts.append("junk after the voxel data")
    volume = int(pick(rng, (0, 1, 2, -1))) if rng.random() < 0.15 else None
    if rng.random() < 0.45:
        content, what = gzipped(rng, content)
        parts.append(what)
        # a gzipped file named .nii, now and then
        name = "t1w.nii.gz" if rng.random() < 0.95 else "t1w.nii"
    else:
        name = "t1w.nii" if rng.random() < 0.95 else "t1w.nii.gz"
    if volume is not None:
        parts.append(f"volume={volume}")
    return Case({name: content}, name, " | ".join(parts), volume)


# --- running one case -----------------------------------------------------------------------


@dataclass
class Outcome:
    accepted: bool
    reason: str | None = None  # the refusal's reason
    data: np.ndarray | None = None
    affine: np.ndarray | None = None
    failure: str | None = None


def downstream(img: nib.Nifti1Image, rng: np.random.Generator, table: bool) -> None:
    """The pipeline's steps that need no network, on ``img`` and a synthetic mask and labels."""
    assert img.ndim == 3 and min(img.shape) >= MIN_VOXELS_PER_AXIS, img.shape
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.float32 and np.all(np.isfinite(data))
    assert np.all(np.isfinite(img.affine)), f"non-finite affine {img.affine.tolist()}"
    lps, source = to_reference_orientation(img)
    zooms = lps_zooms(lps)
    lps_data = np.asarray(lps.dataobj, dtype=np.float32)
    assert "".join(nib.aff2axcodes(lps.affine)) == "LPS"
    assert np.array_equal(from_reference_orientation(lps_data, source), data)
    raw_mask = np.zeros(lps_data.shape, dtype=np.uint8)
    starts = [int(rng.integers(0, n - 1)) for n in raw_mask.shape]
    region = [
        slice(a, int(rng.integers(a + 1, n + 1)))
        for a, n in zip(starts, raw_mask.shape, strict=True)
    ]
    raw_mask[tuple(region)] = 1  # a box anywhere: what DLICV would find, as far as maths go
    mask, _, box, masked = mask_and_crop(lps_data, raw_mask, zooms)
    assert masked.shape == tuple(b - a for a, b in box)
    classes = rng.integers(0, len(LUT), size=masked.shape)
    labels = paste_labels(classes, mask, box, LUT)
    label_img, mask_img = to_native(labels, mask, img)
    assert label_img.shape == img.shape == mask_img.shape
    assert np.allclose(label_img.affine, img.affine, rtol=1e-6, atol=1e-4)
    native = np.asanyarray(label_img.dataobj)
    label_zooms = label_img.header.get_zooms()[:3]
    single, volumes = roi_volumes(native, label_zooms)
    voxel = math.prod(float(z) for z in label_zooms)
    assert voxel > 0 and math.isfinite(voxel), label_zooms
    assert math.isclose(sum(single.values()), np.count_nonzero(native) * voxel, rel_tol=1e-6)
    assert all(math.isfinite(v) for v in volumes.values())
    if table:
        frame = roi_volume_table(native, label_zooms)
        assert frame["volume_mm3"].notna().all()


def load_case(path: Path, case: Case, rng: np.random.Generator, table: bool) -> Outcome:
    try:
        img = load_t1w(path, volume=case.volume)
    except InputImageError as err:
        message = str(err)
        if "\n" in message or "\r" in message or not message.startswith(f"{path}: "):
            return Outcome(False, err.reason, failure=f"bad message {message!r}")
        if err.path != path or len(err.reason.split()) < 2:
            return Outcome(False, err.reason, failure=f"reason names no problem: {message!r}")
        return Outcome(False, err.reason)
    except Exception as exc:  # any other type is what the test looks for
        return Outcome(False, failure=f"load_t1w raised {first_line(exc)}")
    try:
        downstream(img, rng, table)
    except Exception as exc:  # a failure of the pipeline's maths on an accepted image
        return Outcome(True, failure=f"accepted, then downstream {first_line(exc)}")
    return Outcome(True, data=np.asanyarray(img.dataobj), affine=img.affine)


def first_line(exc: Exception) -> str:
    """The exception's type and first line (pytest's assertion rewriting adds many)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def reason_key(reason: str) -> str:
    """A refusal reason without its numbers, so that like refusals count together."""
    key = _NUMBER.sub("N", reason)
    while key != reason:  # "-infx1.5": 1.5 is a number once -inf is N
        reason, key = key, _NUMBER.sub("N", key)
    return key


def test_reason_key_strips_numbers_not_names() -> None:
    assert reason_key("image too small: 20 voxels along axis 2 (shape 40x40x20)") == (
        "image too small: N voxels along axis N (shape NxNxN)"
    )
    assert reason_key("voxel size is not finite (pixdim -infx1.5xnan)") == (
        "voxel size is not finite (pixdim NxNxN)"
    )
    assert reason_key("truncated NIfTI-1 header (200 of 352 bytes); T1w float32 1e+30") == (
        "truncated NIfTI-1 header (N of N bytes); T1w float32 N"
    )
    assert reason_key("type complex64; 3 volumes (choose one with volume=0..2), Error -3") == (
        "type complex64; N volumes (choose one with volume=N..N), Error N"
    )


@dataclass
class FuzzRun:
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    gzipped: int = 0
    twins: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    slowest_case: str = ""
    failures: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def record(self, case: Case, outcome: Outcome, seconds: float) -> None:
        self.cases += 1
        self.gzipped += case.files[case.target][:2] == GZIP_MAGIC
        self.twins += case.twin_of is not None
        if outcome.accepted:
            self.accepted += 1
        else:
            self.refused += 1
            if outcome.reason is not None:
                self.reasons[reason_key(outcome.reason)] += 1
        if seconds > self.slowest:
            self.slowest, self.slowest_case = seconds, case.description
        if seconds > CASE_SECONDS:
            self.fail(case, f"took {seconds:.1f} s (limit {CASE_SECONDS:g} s)")
        if outcome.failure is not None:
            self.fail(case, outcome.failure)

    def fail(self, case: Case, what: str) -> None:
        self.failures.append(f"[{case.description}] {what}")

    def summary(self) -> dict[str, object]:
        return {
            "seed": SEED,
            "cases": self.cases,
            "accepted": self.accepted,
            "refused": self.refused,
            "gzipped": self.gzipped,
            "gzip_twins": self.twins,
            "failures": len(self.failures),
            "seconds": round(self.seconds, 1),
            "slowest_case_seconds": round(self.slowest, 3),
            "slowest_case": self.slowest_case,
            "refusal_reasons": dict(self.reasons.most_common()),
        }


def write_case(folder: Path, case: Case) -> Path:
    for old in folder.iterdir():
        old.unlink()
    for name, content in case.files.items():
        (folder / name).write_bytes(content)
    return folder / case.target


def same_verdict(plain: Outcome, twin: Outcome) -> str | None:
    if plain.accepted != twin.accepted:
        verdicts = {True: "accepted", False: "refused"}
        return (
            f"gzipped {verdicts[twin.accepted]} ({twin.reason}), "
            f"plain {verdicts[plain.accepted]} ({plain.reason})"
        )
    if plain.accepted and not (
        np.array_equal(plain.data, twin.data) and np.array_equal(plain.affine, twin.affine)
    ):
        return "gzipped and plain files load different images"
    return None


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory) -> FuzzRun:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(SEED)
    run = FuzzRun()
    start = time.perf_counter()
    for number in range(N_CASES):
        case = make_case(rng)
        case.description = f"case {number}: {case.description}"
        table = number % 10 == 0
        began = time.perf_counter()
        outcome = load_case(write_case(folder, case), case, rng, table)
        run.record(case, outcome, time.perf_counter() - began)
        plain = case.files[case.target] if case.target == "t1w.nii" else GZIP_MAGIC
        if plain[:2] != GZIP_MAGIC and number % TWIN_EVERY == 0 and outcome.failure is None:
            twin = Case(
                {"t1w.nii.gz": gzip_member(plain, 1)},
                "t1w.nii.gz",
                f"{case.description} | gzipped twin",
                case.volume,
                twin_of=case.description,
            )
            began = time.perf_counter()
            twin_outcome = load_case(write_case(folder, twin), twin, rng, table=False)
            run.record(twin, twin_outcome, time.perf_counter() - began)
            mismatch = same_verdict(outcome, twin_outcome)
            if mismatch is not None:
                run.fail(twin, mismatch)
    run.seconds = time.perf_counter() - start
    target = os.environ.get("DLMUSE_FUZZ_SUMMARY")
    if target:
        summary = {**run.summary(), "first_failures": run.failures[:20]}
        Path(target).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(run.summary(), indent=2))  # shown with -s, and on failure
    return run


def test_every_case_is_loaded_or_refused_in_one_line(fuzz_run: FuzzRun) -> None:
    failures = fuzz_run.failures
    shown = "\n".join(failures[:10])
    assert not failures, f"{len(failures)} of {fuzz_run.cases} cases failed; first ones:\n{shown}"


def test_the_cases_cover_both_verdicts_and_many_reasons(fuzz_run: FuzzRun) -> None:
    assert fuzz_run.cases >= N_CASES
    assert fuzz_run.accepted + fuzz_run.refused == fuzz_run.cases
    assert fuzz_run.accepted >= N_CASES // 10, fuzz_run.summary()
    assert fuzz_run.refused >= N_CASES // 2, fuzz_run.summary()
    assert fuzz_run.gzipped >= N_CASES // 3 and fuzz_run.twins >= N_CASES // 10
    assert len(fuzz_run.reasons) >= 25, fuzz_run.summary()


# --- memory: what a header claims is never allocated ------------------------------------------


def peak_growth(action: Callable[[], object]) -> tuple[int, int]:
    """Run ``action``; return how far it raised traced memory's peak and the resident peak."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        action()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak, (rss_after - rss_before) * 1024  # ru_maxrss is in KiB on Linux


def refuse(path: Path) -> InputImageError:
    with pytest.raises(InputImageError) as excinfo:
        load_t1w(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return excinfo.value


def small_file(version: int, code: int = 4, endian: str = "<") -> NiftiBytes:
    """A valid 40x40x40 file (random, seeded voxels) to build special cases from."""
    rng = np.random.default_rng(SEED)
    hdr = HEADERS[version](endianness=endian)
    hdr.set_data_shape((40, 40, 40))
    hdr.set_data_dtype(data_type_codes.dtype[code])
    hdr.set_sform(np.diag([-1.0, 1.0, 1.0, 1.0]), code=1)
    hdr.set_data_offset(hdr.single_vox_offset)
    voxels = random_voxels(rng, 40**3, code, endian)
    return NiftiBytes(version, endian, bytearray(hdr.binaryblock + bytes(4) + voxels))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_a_header_claiming_more_than_memory_is_refused_without_allocating(
    tmp_path: Path, version: int, suffix: str
) -> None:
    # float64 voxels: 2.8e14 bytes (NIfTI-1's int16 dims), 2^53 bytes (NIfTI-2)
    dims = (32767, 32767, 32767) if version == 1 else (2**20, 2**20, 2**10)
    nifti = small_file(version, code=64)
    for axis, n in enumerate(dims, start=1):
        nifti.put("dim", n, axis)
    content = bytes(nifti.buf)
    path = tmp_path / f"claim{suffix}"
    path.write_bytes(gzip_member(content, 6) if suffix == ".nii.gz" else content)
    assert path.stat().st_size < 1 << 20
    errors: list[InputImageError] = []
    traced, resident = peak_growth(lambda: errors.append(refuse(path)))
    assert traced < MEMORY_SLACK and resident < MEMORY_SLACK, (traced, resident)
    assert any(word in errors[0].reason for word in ("truncated", "too large")), errors[0]


def gzip_bomb(content: bytes, zeros: int) -> bytes:
    """A gzip file of ``content`` then ``zeros`` zero bytes, built without holding the zeros.

    After a full flush the compressor starts afresh, so one compressed block of zeros can be
    repeated; the CRC is computed block by block.
    """
    block = bytes(64 << 20)
    assert zeros % len(block) == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(content) + deflate.flush(zlib.Z_FULL_FLUSH)
    packed_block = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(content)
    for _ in range(zeros // len(block)):
        crc = zlib.crc32(block, crc)
    trailer = struct.pack("<II", crc, (len(content) + zeros) & 0xFFFFFFFF)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    body = head + packed_block * (zeros // len(block)) + deflate.flush()
    return gzip_header + body + trailer


def inflated_size(packed: bytes) -> int:
    """Decompressed length of a single-member gzip file, checked to its CRC, in small steps."""
    stream, total, fed, pending = zlib.decompressobj(wbits=31), 0, 0, b""
    while not stream.eof:
        if not pending:
            pending = packed[fed : fed + (64 << 10)]
            fed += len(pending)
            assert pending, "the gzip stream ends early"
        total += len(stream.decompress(pending, 1 << 20))
        pending = stream.unconsumed_tail
    return total


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    content = bytes(small_file(1).buf)
    bomb = gzip_bomb(content, 4 << 30)
    assert len(bomb) < 8 << 20
    assert inflated_size(bomb) == len(content) + (4 << 30)  # a valid gzip file of 4 GiB
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(bomb)
    del bomb
    errors: list[InputImageError] = []
    began = time.perf_counter()
    traced, resident = peak_growth(lambda: errors.append(refuse(path)))
    assert time.perf_counter() - began < CASE_SECONDS
    assert traced < MEMORY_SLACK and resident < MEMORY_SLACK, (traced, resident)
    assert "gzip stream" in errors[0].reason, errors[0]


# --- the bounded decompression keeps gzip's checks ---------------------------------------------


def test_trailing_bytes_inside_the_gzip_stream_are_accepted_and_checked(tmp_path: Path) -> None:
    content = bytes(small_file(2).buf)
    path = tmp_path / "trailing.nii.gz"
    path.write_bytes(gzip_member(content + bytes(1 << 20), 6))
    plain = tmp_path / "plain.nii"
    plain.write_bytes(content)
    expected = np.asanyarray(load_t1w(plain).dataobj)
    assert np.array_equal(np.asanyarray(load_t1w(path).dataobj), expected)
    damaged = bytearray(path.read_bytes())
    damaged[-6] ^= 0xFF  # the CRC, covering the trailing bytes too
    path.write_bytes(bytes(damaged))
    assert "truncated or corrupt gzip stream" in refuse(path).reason


@pytest.mark.parametrize(
    "layout", ["two-members", "zero-padding", "empty-first-member", "named-member"]
)
def test_gzip_layouts_that_gzip_reads_are_accepted(tmp_path: Path, layout: str) -> None:
    content = bytes(small_file(1, code=16, endian=">").buf)
    if layout == "two-members":
        packed = gzip_member(content[:1000], 1) + gzip_member(content[1000:], 9)
    elif layout == "zero-padding":
        packed = gzip_member(content, 6) + bytes(512)
    elif layout == "empty-first-member":
        packed = gzip_member(b"", 6) + gzip_member(content, 6)
    else:
        buffer = io.BytesIO()
        with gzip.GzipFile("t1w.nii", "wb", 6, buffer, mtime=0) as stream:
            stream.write(content)
        packed = buffer.getvalue()
    assert gzip.decompress(packed) == content
    path = tmp_path / "t1w.nii.gz"
    path.write_bytes(packed)
    img = load_t1w(path)
    expected = np.frombuffer(content, dtype=">f4", offset=352).reshape((40, 40, 40), order="F")
    assert np.array_equal(np.asanyarray(img.dataobj), expected)


def test_many_gzip_members_take_linear_time(tmp_path: Path) -> None:
    """200,000 empty members (4 MB) before the image: gzip.decompress took ~40 s on them."""
    path = tmp_path / "t1w.nii.gz"
    path.write_bytes(gzip_member(b"", 6) * 200_000 + gzip_member(bytes(small_file(1).buf), 6))
    began = time.perf_counter()
    assert load_t1w(path).shape == (40, 40, 40)
    assert time.perf_counter() - began < CASE_SECONDS


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda image: gzip_member(image, 6) + b"junk", "gzip stream (data after its end)"),
        (lambda image: gzip_member(image, 6)[:-3], "gzip stream (ends early)"),
        (lambda image: gzip_member(image[:300], 6), "truncated NIfTI-1 header (300 of 352"),
        # a stream corrupt past its first kB, whose start is not NIfTI: the corruption is named
        (lambda image: gzip_member(b"text " * 9999, 6)[:-5] + b"\0" * 5, "corrupt gzip stream"),
        (lambda image: gzip_member(image + bytes(65 << 20), 1), "gzip stream goes on for over"),
    ],
    ids=["junk-after", "ends-early", "short-header", "corrupt-text", "trailing-65MiB"],
)
def test_gzip_refusals_name_the_problem(
    tmp_path: Path, build: Callable[[bytes], bytes], reason: str
) -> None:
    path = tmp_path / "t1w.nii.gz"
    path.write_bytes(build(bytes(small_file(1).buf)))
    assert reason in refuse(path).reason
