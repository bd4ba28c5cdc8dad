"""Tests of dlmuse_bids.io on tiny NIfTI files written byte for byte in tmp_path."""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from dlmuse_bids import io as dlio
from dlmuse_bids.io import (
    InputImageError,
    describe_image,
    load_t1w,
    make_label_image,
    save_nifti_atomic,
)

SHAPE = (40, 40, 40)
# LAS, 1 mm, origin near the centre.
AFFINE = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -20], [0, 0, 1.0, -20], [0, 0, 0, 1]])
# A slightly rotated, anisotropic grid for the sform, different from the qform.
OBLIQUE = np.array(
    [[-0.9, 0.1, 0.0, 18.5], [0.1, 1.1, 0.05, -22.25], [0.0, -0.05, 1.3, -19.0], [0, 0, 0, 1]]
)
GEOMETRY_FIELDS = (
    "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "qform_code",
    "srow_x", "srow_y", "srow_z", "sform_code", "xyzt_units",
)  # fmt: skip


def make_data(shape: tuple[int, ...] = SHAPE, dtype: type = np.float32) -> np.ndarray:
    """Random positive voxel values that fit ``dtype``."""
    rng = np.random.default_rng(7)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(1, 250, size=shape).astype(dtype)
    return rng.uniform(1.0, 1000.0, size=shape).astype(dtype)


def make_header(
    shape: tuple[int, ...] = SHAPE,
    dtype: type = np.float32,
    *,
    endianness: str = "<",
    sform: np.ndarray | None = AFFINE,
    qform: np.ndarray | None = AFFINE,
) -> nib.Nifti1Header:
    """A NIfTI-1 header; a form that is None gets code 0 (pixdim still set from AFFINE)."""
    hdr = nib.Nifti1Header(endianness=endianness)
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(AFFINE if qform is None else qform, code=0 if qform is None else 1)
    hdr.set_sform(AFFINE if sform is None else sform, code=0 if sform is None else 1)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def write_nifti(path: Path, data: np.ndarray, hdr: nib.Nifti1Header | None = None) -> Path:
    """Write header and voxel bytes verbatim; nibabel's writer would redo scaling and geometry."""
    hdr = (hdr or make_header(data.shape, data.dtype)).copy()
    hdr.set_data_offset(352)
    voxels = np.asarray(data).astype(hdr.get_data_dtype()).tobytes(order="F")
    block = hdr.binaryblock + b"\0" * 4 + voxels
    path.write_bytes(gzip.compress(block) if path.name.endswith(".gz") else block)
    return path


def assert_refused(path: Path, reason: str, **kwargs: object) -> InputImageError:
    with pytest.raises(InputImageError) as excinfo:
        load_t1w(path, **kwargs)
    err = excinfo.value
    message = str(err)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: "), message
    assert reason in err.reason and reason in message, message
    assert err.path == path
    return err


# --- accepted inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
def test_loads_dtypes_as_float32(tmp_path: Path, suffix: str, dtype: type) -> None:
    data = make_data(dtype=dtype)
    path = write_nifti(tmp_path / f"t1w{suffix}", data)
    img = load_t1w(path)
    assert img.shape == SHAPE
    assert img.get_data_dtype() == np.float32
    loaded = np.asanyarray(img.dataobj)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, data.astype(np.float32))
    np.testing.assert_array_equal(img.affine, nib.load(path).affine)
    assert describe_image(img)["dtype"] == np.dtype(dtype).name


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_loads_big_endian(tmp_path: Path, dtype: type) -> None:
    data = make_data(dtype=dtype)
    path = write_nifti(tmp_path / "be.nii.gz", data, make_header(dtype=dtype, endianness=">"))
    assert nib.load(path).header.endianness == ">"
    img = load_t1w(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data.astype(np.float32))
    assert img.extra["source_byteorder"] == "big"
    assert describe_image(img)["dtype"] == np.dtype(dtype).name


def test_applies_scl_slope_and_inter(tmp_path: Path) -> None:
    data = make_data(dtype=np.int16)
    hdr = make_header(dtype=np.int16)
    hdr.set_slope_inter(2.5, -10.0)
    img = load_t1w(write_nifti(tmp_path / "scaled.nii", data, hdr))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data * 2.5 - 10.0)
    assert img.header.get_slope_inter() == (None, None)


@pytest.mark.parametrize("name", ["sub 01 T1w.nii.gz", "sujet_é_ñ_脑 (copie).nii"])
def test_accepts_awkward_file_names(tmp_path: Path, name: str) -> None:
    img = load_t1w(write_nifti(tmp_path / name, make_data()))
    assert img.shape == SHAPE
    assert img.extra["source_path"] == str(tmp_path / name)


def test_accepts_symlink_to_image(tmp_path: Path) -> None:
    target = write_nifti(tmp_path / "real.nii.gz", make_data())
    link = tmp_path / "link.nii.gz"
    link.symlink_to(target)
    assert load_t1w(link).shape == SHAPE


def test_single_volume_4d_is_squeezed(tmp_path: Path) -> None:
    data = make_data((*SHAPE, 1))
    img = load_t1w(write_nifti(tmp_path / "one.nii.gz", data))
    assert img.shape == SHAPE
    assert img.header["dim"][0] == 3
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data[..., 0])


def test_volume_selects_one_of_several(tmp_path: Path) -> None:
    data = make_data((*SHAPE, 3))
    img = load_t1w(write_nifti(tmp_path / "multi.nii.gz", data), volume=2)
    assert img.shape == SHAPE
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data[..., 2])
    assert img.extra["volume"] == 2


def test_a_volume_asked_of_a_single_volume_file_is_the_file(tmp_path: Path) -> None:
    """--t1w-volume picks among several volumes; a 3-D (or one-volume) file is used whole."""
    data = make_data()
    img = load_t1w(write_nifti(tmp_path / "3d.nii.gz", data), volume=1)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert img.extra["volume"] is None
    one = load_t1w(write_nifti(tmp_path / "4d.nii.gz", make_data((*SHAPE, 1))), volume=2)
    assert one.shape == SHAPE and one.extra["volume"] == 0


def test_keeps_sform_qform_matrices_and_codes(tmp_path: Path) -> None:
    hdr = make_header(sform=OBLIQUE)
    hdr.set_sform(OBLIQUE, code=4)
    path = write_nifti(tmp_path / "oblique.nii.gz", make_data(), hdr)
    on_disk = nib.load(path).header
    img = load_t1w(path)
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(img.header[field], on_disk[field], err_msg=field)
    np.testing.assert_array_equal(img.header["pixdim"][:4], on_disk["pixdim"][:4])
    np.testing.assert_array_equal(img.affine, on_disk.get_best_affine())
    summary = describe_image(img)
    assert summary["affine_source"] == "sform"
    assert (summary["sform_code"], summary["qform_code"]) == (4, 1)
    assert summary["sform_qform_mismatch"] is True


@pytest.mark.parametrize(
    ("sform", "qform", "source"),
    [(AFFINE, AFFINE, "sform"), (OBLIQUE, None, "sform"), (None, AFFINE, "qform"),
     (None, None, "fallback")],
)  # fmt: skip
def test_affine_source_follows_nibabel(
    tmp_path: Path, sform: np.ndarray | None, qform: np.ndarray | None, source: str
) -> None:
    path = write_nifti(tmp_path / "t1w.nii", make_data(), make_header(sform=sform, qform=qform))
    img = load_t1w(path)
    best = nib.load(path).header.get_best_affine()
    np.testing.assert_array_equal(img.affine, best)
    summary = describe_image(img)
    assert summary["affine_source"] == source
    assert summary["sform_qform_mismatch"] is False
    assert summary["orientation"] == list(aff2axcodes(best))


def test_describe_image_is_json_ready(tmp_path: Path) -> None:
    img = load_t1w(write_nifti(tmp_path / "t1w.nii.gz", make_data(dtype=np.int16)))
    summary = json.loads(json.dumps(describe_image(img)))
    assert summary["shape"] == list(SHAPE)
    assert summary["zooms"] == [1.0, 1.0, 1.0]
    assert summary["orientation"] == ["L", "A", "S"]
    assert summary["dtype"] == "int16"


def test_accepts_nifti2(tmp_path: Path) -> None:
    data = make_data()
    path = tmp_path / "n2.nii.gz"
    nib.Nifti2Image(data, AFFINE).to_filename(path)
    img = load_t1w(path)
    assert isinstance(img, nib.Nifti1Image) and img.extra["source_format"] == "NIfTI-2"
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_array_equal(img.affine, AFFINE)


def test_input_image_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(InputImageError("a b.nii", "file is empty (0 bytes)")))
    assert str(err) == "a b.nii: file is empty (0 bytes)"
    assert isinstance(err, ValueError) and err.reason == "file is empty (0 bytes)"


# --- refused inputs -------------------------------------------------------------------------

Builder = Callable[[Path], Path]


def raw_file(name: str, content: bytes) -> Builder:
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name

    return build


def nifti(
    shape: tuple[int, ...] = SHAPE,
    dtype: type = np.float32,
    header: Callable[[nib.Nifti1Header], None] | None = None,
    data: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Builder:
    def build(tmp: Path) -> Path:
        values = make_data(shape, dtype)
        hdr = make_header(shape, dtype)
        if header is not None:
            header(hdr)
        return write_nifti(tmp / "t1w.nii.gz", values if data is None else data(values), hdr)

    return build


def set_item(field: str, index: int, value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        hdr[field][index] = value

    return edit


def set_sform(affine: np.ndarray) -> Callable[[nib.Nifti1Header], None]:
    return lambda hdr: hdr.set_sform(affine, code=1)


def qform_only(field: str, value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        hdr["sform_code"] = 0
        hdr[field] = value

    return edit


def with_voxel(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def edit(data: np.ndarray) -> np.ndarray:
        data = data.copy()
        data[3, 4, 5] = value
        return data

    return edit


def broken_link(tmp: Path) -> Path:
    (tmp / "t1w.nii.gz").symlink_to(tmp / "gone.nii.gz")
    return tmp / "t1w.nii.gz"


ANNEX_KEY = "MD5E-s2048--0123456789abcdef0123456789abcdef.nii.gz"


def annexed_absent(tmp: Path) -> Path:
    """A DataLad/git-annex file whose content was not fetched: a link to a missing object."""
    (tmp / "t1w.nii.gz").symlink_to(f".git/annex/objects/Xq/7Z/{ANNEX_KEY}/{ANNEX_KEY}")
    return tmp / "t1w.nii.gz"


def directory(tmp: Path) -> Path:
    (tmp / "t1w.nii").mkdir()
    return tmp / "t1w.nii"


def nibabel_saved(name: str, klass: type) -> Builder:
    def build(tmp: Path) -> Path:
        klass(make_data(), AFFINE).to_filename(tmp / name)
        return tmp / name

    return build


def edited_bytes(suffix: str, edit: Callable[[bytes], bytes]) -> Builder:
    def build(tmp: Path) -> Path:
        path = write_nifti(tmp / f"t1w{suffix}", make_data())
        path.write_bytes(edit(path.read_bytes()))
        return path

    return build


def flip(start: int, stop: int) -> Callable[[bytes], bytes]:
    def edit(content: bytes) -> bytes:
        mutable = bytearray(content)
        for i in range(start, stop):
            mutable[i] ^= 0xA5
        return bytes(mutable)

    return edit


SINGULAR = np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
NAN_SFORM = AFFINE.copy()
NAN_SFORM[0, 3] = np.nan
COARSE_SFORM = np.diag([6.0, 1.0, 1.0, 1.0])

REFUSED: dict[str, tuple[Builder, dict[str, int], str]] = {
    "missing": (lambda tmp: tmp / "absent.nii.gz", {}, "file does not exist"),
    "broken-symlink": (broken_link, {}, "broken symbolic link"),
    "annex-unlocked-not-fetched": (
        raw_file("t1w.nii.gz", f"/annex/objects/{ANNEX_KEY}\n".encode()),
        {},
        "content not downloaded (git-annex): run `datalad get",
    ),
    "annex-not-fetched": (
        annexed_absent,
        {},
        "content not downloaded (git-annex): run `datalad get",
    ),
    "directory": (directory, {}, "is a directory"),
    "zero-byte": (raw_file("t1w.nii.gz", b""), {}, "file is empty (0 bytes)"),
    "text": (raw_file("t1w.nii", b"subject,age\n01,42\n" * 40), {}, "looks like a text file"),
    "gzipped-text": (raw_file("t1w.nii.gz", gzip.compress(b"hello\n" * 99)), {}, "text file"),
    "png": (raw_file("t1w.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(600)), {}, "a PNG image"),
    "minc2": (raw_file("t1w.mnc", b"\x89HDF\r\n\x1a\n" + bytes(600)), {}, "HDF5 file"),
    "minc1": (raw_file("t1w.mnc", b"CDF\x01" + bytes(600)), {}, "NetCDF file"),
    "dicom": (raw_file("t1w.nii", bytes(128) + b"DICM" + bytes(600)), {}, "a DICOM file"),
    "junk": (raw_file("t1w.nii", b"\x07\x00junk" * 100), {}, "no NIfTI-1 or NIfTI-2 header"),
    "mgz": (nibabel_saved("t1w.mgz", nib.MGHImage), {}, "FreeSurfer MGH"),
    "analyze": (nibabel_saved("t1w.hdr", nib.AnalyzeImage), {}, "Analyze 7.5 header"),
    "nifti-pair": (nibabel_saved("t1w.hdr", nib.Nifti1Pair), {}, ".hdr/.img pair"),
    "gzip-truncated": (
        edited_bytes(".nii.gz", lambda b: b[: len(b) // 2]),
        {},
        "truncated or corrupt gzip stream",
    ),
    "gzip-bad-crc": (edited_bytes(".nii.gz", flip(-8, -4)), {}, "truncated or corrupt gzip"),
    "gzip-garbled": (edited_bytes(".nii.gz", flip(400, 464)), {}, "truncated or corrupt gzip"),
    "nii-truncated": (edited_bytes(".nii", lambda b: b[:2000]), {}, "voxel data truncated"),
    "header-truncated": (edited_bytes(".nii", lambda b: b[:200]), {}, "truncated NIfTI-1 header"),
    "bad-dim0": (nifti(header=set_item("dim", 0, 9)), {}, "dim[0] is 9"),
    "complex": (nifti(dtype=np.complex64), {}, "unsupported voxel data type complex64"),
    "2d": (nifti((64, 64)), {}, "image is 2-D (shape 64x64); a 3-D T1w volume is needed"),
    "5d": (nifti((*SHAPE, 1, 2)), {}, "image is 5-D (shape 40x40x40x1x2)"),
    "4d-several": (nifti((*SHAPE, 3)), {}, "image is 4-D with 3 volumes (shape 40x40x40x3)"),
    "4d-no-such-volume": (nifti((*SHAPE, 3)), {"volume": 3}, "volume 3 requested"),
    "small": (nifti((40, 40, 20)), {}, "20 voxels along axis 2"),
    "all-zero": (nifti(data=np.zeros_like), {}, "all voxels are zero"),
    "constant": (nifti(data=lambda d: np.full_like(d, 7)), {}, "all voxels have the same value"),
    "nan": (nifti(data=with_voxel(np.nan)), {}, "1 NaN and 0 infinite"),
    "inf": (nifti(data=with_voxel(-np.inf)), {}, "0 NaN and 1 infinite"),
    "float32-overflow": (
        nifti(dtype=np.float64, data=with_voxel(1e300)),
        {},
        "infinite or beyond float32 range",
    ),
    "zero-voxel": (nifti(header=set_item("pixdim", 2, 0.0)), {}, "voxel size must be positive"),
    "negative-voxel": (nifti(header=set_item("pixdim", 1, -1.0)), {}, "must be positive"),
    "coarse-voxel": (nifti(header=set_item("pixdim", 3, 6.0)), {}, "above the 5 mm limit"),
    "nan-voxel": (nifti(header=set_item("pixdim", 1, np.nan)), {}, "voxel size is not finite"),
    "coarse-sform": (nifti(header=set_sform(COARSE_SFORM)), {}, "from the sform is above"),
    "singular-sform": (nifti(header=set_sform(SINGULAR)), {}, "sform affine is singular"),
    "nan-sform": (nifti(header=set_sform(NAN_SFORM)), {}, "sform affine has non-finite"),
    "nan-qform": (nifti(header=qform_only("qoffset_x", np.nan)), {}, "qform affine has non-"),
    "bad-quaternion": (nifti(header=qform_only("quatern_b", 2.0)), {}, "invalid NIfTI header"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_with_one_line_reason(tmp_path: Path, case: str) -> None:
    build, kwargs, reason = REFUSED[case]
    assert_refused(build(tmp_path), reason, **kwargs)


def test_refuses_unreadable_file(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "locked.nii.gz", make_data())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("chmod 000 does not stop this user (root) from reading")
        assert_refused(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal as above, reached even as root by making the read itself fail."""
    path = write_nifti(tmp_path / "locked.nii.gz", make_data())

    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert_refused(path, "permission denied")


def test_message_stays_on_one_line_for_odd_names(tmp_path: Path) -> None:
    path = tmp_path / "bad\nname.nii"
    path.write_bytes(b"")
    message = str(pytest.raises(InputImageError, load_t1w, path).value)
    assert "\n" not in message
    assert message.endswith("bad\\nname.nii: file is empty (0 bytes)")


# --- label images and atomic writes ---------------------------------------------------------


def oblique_reference(tmp_path: Path) -> nib.Nifti1Image:
    """A big-endian int16 T1w with an oblique sform (code 4), a qform (code 1), mm/msec units."""
    hdr = make_header(dtype=np.int16, endianness=">", sform=OBLIQUE)
    hdr.set_sform(OBLIQUE, code=4)
    hdr.set_xyzt_units("mm", "msec")
    return load_t1w(write_nifti(tmp_path / "ref T1w.nii.gz", make_data(dtype=np.int16), hdr))


def make_labels(shape: tuple[int, ...] = SHAPE, high: int = 208) -> np.ndarray:
    return np.random.default_rng(3).integers(0, high, size=shape)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_label_image_round_trip_is_bit_exact(tmp_path: Path, suffix: str) -> None:
    reference = oblique_reference(tmp_path)
    labels = make_labels()
    path = tmp_path / f"seg{suffix}"
    save_nifti_atomic(make_label_image(labels, reference), path)
    back = nib.load(path)
    assert back.shape == reference.shape
    assert back.get_data_dtype() == np.uint8
    stored = np.asanyarray(back.dataobj)
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, labels)
    assert back.header.get_slope_inter() == (None, None)
    assert back.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(back.affine, reference.affine)
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(back.header[field], reference.header[field], err_msg=field)
    np.testing.assert_array_equal(back.header["pixdim"][:4], reference.header["pixdim"][:4])
    assert int(back.header["sform_code"]) == 4 and int(back.header["qform_code"]) == 1
    assert back.header.get_xyzt_units() == ("mm", "msec")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref T1w.nii.gz", f"seg{suffix}"]


def test_label_image_wider_dtype(tmp_path: Path) -> None:
    labels = make_labels(high=700)
    path = tmp_path / "seg.nii.gz"
    save_nifti_atomic(make_label_image(labels, oblique_reference(tmp_path), np.uint16), path)
    stored = np.asanyarray(nib.load(path).dataobj)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, labels)


def test_label_image_follows_a_stale_reference_affine() -> None:
    reference = nib.Nifti1Image(make_data(), AFFINE)
    reference.affine[0, 3] = 99.0  # header not yet updated: nibabel would write this affine
    label = make_label_image(make_labels(), reference)
    np.testing.assert_array_equal(label.affine, reference.affine)
    written = nib.Nifti1Image.from_bytes(reference.to_bytes()).header
    for field in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(label.header[field], written[field], err_msg=field)


@pytest.mark.parametrize(
    ("labels", "dtype", "match"),
    [
        (np.zeros((40, 40, 39), np.uint8), np.uint8, "does not match reference shape"),
        (np.full(SHAPE, 300), np.uint8, "does not fit uint8"),
        (np.full(SHAPE, -1), np.uint8, "does not fit uint8"),
        (np.full(SHAPE, 1.5), np.uint8, "non-integral"),
        (np.zeros(SHAPE, np.uint8), np.float32, "integer type"),
    ],
)
def test_label_image_refuses(labels: np.ndarray, dtype: type, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_label_image(labels, nib.Nifti1Image(make_data(), AFFINE), dtype)


def test_float_image_round_trips_through_load(tmp_path: Path) -> None:
    img = oblique_reference(tmp_path)
    path = tmp_path / "again.nii.gz"
    save_nifti_atomic(img, path)
    back = load_t1w(path)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))
    np.testing.assert_array_equal(back.affine, img.affine)
    first = path.read_bytes()
    save_nifti_atomic(img, path)
    assert path.read_bytes() == first  # gzip without a timestamp: reproducible outputs


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    final = tmp_path / "seg.nii.gz"
    if existing:
        final.write_bytes(b"previous output")
    image = make_label_image(make_labels(), nib.Nifti1Image(make_data(), AFFINE))
    real_write = os.write
    listings: list[list[str]] = []

    def full_disk(fd: int, data: bytes) -> int:
        listings.append(sorted(p.name for p in tmp_path.iterdir()))
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(dlio.os, "write", full_disk)
        with pytest.raises(OSError) as excinfo:
            save_nifti_atomic(image, final)
    assert excinfo.value.errno == errno.ENOSPC
    temporary = [name for name in listings[0] if name != final.name]
    assert len(temporary) == 1 and temporary[0].startswith(".seg.nii.gz.")
    assert list(tmp_path.iterdir()) == ([final] if existing else [])
    if existing:
        assert final.read_bytes() == b"previous output"


def test_fsync_happens_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(dlio.os, "fsync", fsync)
    monkeypatch.setattr(dlio.os, "replace", replace)
    save_nifti_atomic(nib.Nifti1Image(make_data(), AFFINE), tmp_path / "t1w.nii")
    assert calls[:2] == ["fsync", "replace"]


def test_failed_rename_removes_temporary(tmp_path: Path) -> None:
    final = tmp_path / "seg.nii"
    (final / "occupied").mkdir(parents=True)  # a non-empty directory cannot be replaced
    with pytest.raises(OSError):
        save_nifti_atomic(nib.Nifti1Image(make_data(), AFFINE), final)
    assert list(tmp_path.iterdir()) == [final]


def test_save_refuses_other_names_and_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in .nii or .nii.gz"):
        save_nifti_atomic(nib.Nifti1Image(make_data(), AFFINE), tmp_path / "seg.mgz")
    with pytest.raises(TypeError, match="Nifti1Image"):
        save_nifti_atomic(nib.MGHImage(make_data(), AFFINE), tmp_path / "seg.nii")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
