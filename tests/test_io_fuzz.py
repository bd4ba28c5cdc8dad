"""Seeded property test of :func:`dlmuse_bids.io.load_t1w` on thousands of damaged NIfTI files.

Each case starts from a small valid NIfTI-1 or NIfTI-2 file written byte for byte, then edits
header fields at their offsets (dim, pixdim, datatype, scaling, qform/sform, vox_offset, magic,
or any field at random), the voxel bytes, or the file as a whole (truncation, byte flips, gzip
damage, ``.hdr``/``.img`` pairs). Whatever the bytes, ``load_t1w`` must either return an image
that the pipeline's network-free maths (LPS reorientation, mask and crop, paste, back to native,
ROI volumes) accept, or raise an :class:`InputImageError` whose message is one line starting with
the path. Any other exception, or a case slower than ``CASE_SECONDS``, is a failure.

The cases come from :mod:`tests.support.nifti_fuzz`. Set ``DLMUSE_FUZZ_SUMMARY`` to a file name
to get the run's counts and refusal reasons as JSON.
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
from tests.support.nifti_fuzz import (
    GZIP_MAGIC,
    HEADERS,
    Case,
    NiftiBytes,
    gzip_member,
    make_case,
    random_voxels,
)

SEED = 19
N_CASES = 5000
#: Every 3rd plain .nii case is loaded again gzipped: the verdict must not change.
TWIN_EVERY = 3
#: Generous bound on one load (plus its downstream maths) on a slow, busy core.
CASE_SECONDS = 5.0
#: Most a refused too-large file may raise the peak of traced (or resident) memory.
MEMORY_SLACK = 32 << 20
LUT = class_to_muse_lut()
# A number in a message, not a digit of a name (T1w, float32, complex64, NIfTI-1); those of a
# shape or of voxel sizes (40x40x40, 1.5xnanx-inf) are numbers, one at a time.
_NUMBER = re.compile(
    r"(?<![-0-9A-Za-wyz])(?<!\d\.)(?<![A-MO-Za-z]x)"
    r"(?:-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|-?(?:nan|inf)(?![a-wyz]))"
)


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
