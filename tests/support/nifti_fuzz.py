"""A seeded generator of damaged NIfTI files, for :mod:`tests.test_io_fuzz`.

Each case starts from a small valid NIfTI-1 or NIfTI-2 file written byte for byte, then edits
header fields at their offsets (dim, pixdim, datatype, scaling, qform/sform, vox_offset, magic,
or any field at random), the voxel bytes, or the file as a whole (truncation, byte flips, gzip
damage, ``.hdr``/``.img`` pairs). Each edit says what it did, for the failure messages.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.nifti1 import data_type_codes
from nibabel.quaternions import quat2mat

from dlmuse_bids.io import MIN_VOXELS_PER_AXIS

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
