"""Fuzz-style probes: many malformed files fed to every reader, and to the checkpoint loader.

Each probe must end in a :class:`MedfoundryError` whose message is one line and names the bad file (the file
itself, or the folder for a reader that takes folders and skips what is not its format). A probe whose dataset
loads is then asked for its pixels, since image files are decoded lazily, after ``load_dataset`` returns.
``test_every_reader_is_probed`` keeps the list honest when a reader is registered.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medfoundry.data.registry import READERS, load_dataset
from medfoundry.errors import MedfoundryError

CT_SERIES = Path("totalsegmentator_ct_examples") / "example_ct_dicom"
SLIDE = Path("wsi_samples") / "CMU-1-Small-Region.svs"
IDRID = Path("idrid_dr_grading")


@dataclass
class Probe:
    """What to load, the file the one-line error must name, and the reader options."""

    spec: str
    names: Path | str
    options: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[Path, Path], Probe]  # (a fresh folder, shared data) -> Probe
PROBES: dict[str, tuple[str, Builder]] = {}  # probe name -> (reader prefix, builder)


def probe(reader: str, name: str) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        PROBES[f"{reader}:{name}"] = (reader, build)
        return build

    return register


# ------------------------------------------------------------------------------------------ file makers


def _random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(path: Path, side: int = 30000) -> Path:
    """A PNG whose header claims ``side`` x ``side`` RGB pixels (no pixel data needed: Pillow checks the header)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


def _png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
        "train_labels": np.array([0, 1, 0, 1]),
        **arrays,
    }
    with path.open("wb") as handle:  # np.savez appends .npz to a str path; a handle keeps the name as given
        np.savez(handle, **arrays)
    return path


def _manifest(folder: Path, rows: list[str], header: str = "path,label") -> Path:
    csv = folder / "labels.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    if affine is None:
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
        return path
    # nibabel refuses to derive a qform from a broken affine, so it goes in the sform alone, as some tools write;
    # with no affine given, saving keeps the header's.
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_qform(None, code=0)
    header.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(data, None, header), path)
    return path


def _class_folder(tmp: Path) -> Path:
    folder = tmp / "images" / "class_a"
    folder.mkdir(parents=True)
    return folder


def _series(tmp: Path, shared: Path, count: int = 3) -> tuple[Path, list[Path]]:
    folder = tmp / "series"
    folder.mkdir()
    copies = [Path(shutil.copy(file, folder)) for file in sorted((shared / CT_SERIES).iterdir())[:count]]
    return folder, copies


def _idrid(tmp: Path, shared: Path) -> Path:
    """A small IDRiD tree: one labelled image per split, images linked from the shared copy."""
    root = tmp / "idrid"
    (root / "labels").mkdir(parents=True)
    source = shared / IDRID
    for split in ("train", "test"):
        (root / f"{split}_images").mkdir()
        lines = (source / "labels" / f"{split}_labels.csv").read_text(encoding="utf-8-sig").splitlines()
        image = sorted((source / f"{split}_images").glob("*.jpg"))[0]
        os.symlink(image, root / f"{split}_images" / image.name)
        row = next(line for line in lines[1:] if line.startswith(image.stem + ","))
        (root / "labels" / f"{split}_labels.csv").write_text(f"{lines[0]}\n{row}\n")
    return root


# ------------------------------------------------------------------------------------------ medmnist


@probe("medmnist", "empty file")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "empty.npz").write_bytes(b"")
    return Probe(str(path), path)


@probe("medmnist", "random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "random.npz").write_bytes(_random_bytes())
    return Probe(str(path), path)


@probe("medmnist", "wrong magic (a PNG)")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "image.npz"
    _png(tmp / "x.png").rename(path)
    return Probe(str(path), path)


@probe("medmnist", "truncated archive")
def _(tmp: Path, shared: Path) -> Probe:
    path = _truncate(_npz(tmp / "cut.npz"))
    return Probe(str(path), path)


@probe("medmnist", "a single .npy array")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "single.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros((4, 8, 8)))
    return Probe(str(path), path)


@probe("medmnist", "no MedMNIST keys")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "keys.npz"
    with path.open("wb") as handle:
        np.savez(handle, x=np.zeros(3))
    return Probe(str(path), path)


@probe("medmnist", "negative labels")
def _(tmp: Path, shared: Path) -> Probe:
    path = _npz(tmp / "negative.npz", train_labels=np.array([0, -1, 1, 0]))
    return Probe(str(path), path)


@probe("medmnist", "mismatched lengths")
def _(tmp: Path, shared: Path) -> Probe:
    path = _npz(tmp / "lengths.npz", train_labels=np.array([0, 1, 0]))
    return Probe(str(path), path)


@probe("medmnist", "complex images")
def _(tmp: Path, shared: Path) -> Probe:
    images = np.random.default_rng(0).normal(size=(4, 8, 8)) * (1 + 1j)
    path = _npz(tmp / "complex.npz", train_images=images)
    return Probe(str(path), path)


@probe("medmnist", "NaN pixels")
def _(tmp: Path, shared: Path) -> Probe:
    images = np.random.default_rng(0).normal(size=(4, 8, 8))
    images[2, 3, 3] = np.nan
    path = _npz(tmp / "nan.npz", train_images=images)
    return Probe(str(path), path)


@probe("medmnist", "string labels")
def _(tmp: Path, shared: Path) -> Probe:
    path = _npz(tmp / "strings.npz", train_labels=np.array(["a", "b", "a", "b"]))
    return Probe(str(path), path)


@probe("medmnist", "1-D images")
def _(tmp: Path, shared: Path) -> Probe:
    path = _npz(tmp / "flat.npz", train_images=np.arange(4, dtype=np.uint8))
    return Probe(str(path), path)


@probe("medmnist", "images without labels")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "unlabelled.npz"
    with path.open("wb") as handle:
        np.savez(handle, train_images=np.zeros((4, 8, 8)))
    return Probe(str(path), path)


# ------------------------------------------------------------------------------------------ csv manifest


@probe("csv", "empty file")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "empty.csv").write_bytes(b"")
    return Probe(str(path), path)


@probe("csv", "random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "random.csv").write_bytes(_random_bytes())
    return Probe(str(path), path)


@probe("csv", "wrong magic (a PNG)")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "image.csv"
    _png(tmp / "x.png").rename(path)
    return Probe(str(path), path)


@probe("csv", "latin-1 encoding")
def _(tmp: Path, shared: Path) -> Probe:
    _png(tmp / "a.png")
    (path := tmp / "latin1.csv").write_bytes("path,label\na.png,Bénin\n".encode("latin-1"))
    return Probe(str(path), path)


@probe("csv", "missing columns")
def _(tmp: Path, shared: Path) -> Probe:
    path = _manifest(tmp, ["x,1"], header="file,grade")
    return Probe(str(path), path)


@probe("csv", "header only")
def _(tmp: Path, shared: Path) -> Probe:
    path = _manifest(tmp, [])
    return Probe(str(path), path)


@probe("csv", "NaN labels")
def _(tmp: Path, shared: Path) -> Probe:
    _png(tmp / "a.png"), _png(tmp / "b.png", 1)
    path = _manifest(tmp, ["a.png,benign", "b.png,NaN"])
    return Probe(str(path), path)


@probe("csv", "negative labels")
def _(tmp: Path, shared: Path) -> Probe:
    _png(tmp / "a.png"), _png(tmp / "b.png", 1)
    path = _manifest(tmp, ["a.png,0", "b.png,-1"])
    return Probe(str(path), path)


@probe("csv", "missing image")
def _(tmp: Path, shared: Path) -> Probe:
    path = _manifest(tmp, ["nowhere.png,0"])
    return Probe(str(path), path)


@probe("csv", "empty path cell")
def _(tmp: Path, shared: Path) -> Probe:
    path = _manifest(tmp, [",0"])
    return Probe(str(path), path)


@probe("csv", "PNG decompression bomb")
def _(tmp: Path, shared: Path) -> Probe:
    bomb = _png_bomb(tmp / "bomb.png")
    return Probe(str(_manifest(tmp, ["bomb.png,0"])), bomb)


@probe("csv", "PNG decompression bomb, cropped")
def _(tmp: Path, shared: Path) -> Probe:
    bomb = _png_bomb(tmp / "bomb.png")
    return Probe(str(_manifest(tmp, ["bomb.png,0"])), bomb, {"crop_size": 16})


@probe("csv", "truncated PNG")
def _(tmp: Path, shared: Path) -> Probe:
    image = _truncate(_png(tmp / "cut.png"), 0.6)
    return Probe(str(_manifest(tmp, ["cut.png,0"])), image)


@probe("csv", "zero-byte image")
def _(tmp: Path, shared: Path) -> Probe:
    (image := tmp / "zero.png").write_bytes(b"")
    return Probe(str(_manifest(tmp, ["zero.png,0"])), image)


@probe("csv", "invalid patient_regex")
def _(tmp: Path, shared: Path) -> Probe:
    _png(tmp / "a.png")
    path = _manifest(tmp, ["a.png,0"])
    return Probe(str(path), path, {"patient_regex": "(unclosed"})


# ------------------------------------------------------------------------------------------ image folder


@probe("folder", "no images")
def _(tmp: Path, shared: Path) -> Probe:
    (folder := _class_folder(tmp)).joinpath("notes.txt").write_text("no images here")
    return Probe(f"folder:{folder.parent}", folder.parent)


@probe("folder", "zero-byte PNG")
def _(tmp: Path, shared: Path) -> Probe:
    (image := _class_folder(tmp) / "zero.png").write_bytes(b"")
    return Probe(f"folder:{image.parent.parent}", image)


@probe("folder", "random bytes as JPEG")
def _(tmp: Path, shared: Path) -> Probe:
    (image := _class_folder(tmp) / "random.jpg").write_bytes(_random_bytes())
    return Probe(f"folder:{image.parent.parent}", image)


@probe("folder", "truncated JPEG")
def _(tmp: Path, shared: Path) -> Probe:
    image = _class_folder(tmp) / "cut.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image, quality=95)
    _truncate(image, 0.4)
    return Probe(f"folder:{image.parent.parent}", image)


@probe("folder", "PNG decompression bomb")
def _(tmp: Path, shared: Path) -> Probe:
    bomb = _png_bomb(_class_folder(tmp) / "bomb.png")
    return Probe(f"folder:{bomb.parent.parent}", bomb)


@probe("folder", "text as TIFF")
def _(tmp: Path, shared: Path) -> Probe:
    (image := _class_folder(tmp) / "scan.tif").write_text("II*\0 not really a TIFF")
    return Probe(f"folder:{image.parent.parent}", image)


# ------------------------------------------------------------------------------------------ whole-slide images


@probe("wsi", "empty file")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "empty.svs").write_bytes(b"")
    return Probe(str(path), path)


@probe("wsi", "random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "random.svs").write_bytes(_random_bytes())
    return Probe(str(path), path)


@probe("wsi", "wrong magic (a PNG)")
def _(tmp: Path, shared: Path) -> Probe:
    path = tmp / "image.svs"
    _png(tmp / "x.png").rename(path)
    return Probe(str(path), path)


@probe("wsi", "truncated slide")
def _(tmp: Path, shared: Path) -> Probe:
    path = _truncate(Path(shutil.copy(shared / SLIDE, tmp / "cut.svs")), 0.3)
    return Probe(str(path), path)


@probe("wsi", "TIFF header only")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "header.tif").write_bytes(b"II*\0" + struct.pack("<I", 8) + b"\0" * 32)
    return Probe(f"wsi:{path}", path)


# ------------------------------------------------------------------------------------------ NIfTI


@probe("nifti", "empty file")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "empty.nii.gz").write_bytes(b"")
    return Probe(str(path), path)


@probe("nifti", "random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "random.nii").write_bytes(_random_bytes())
    return Probe(str(path), path)


@probe("nifti", "gzip of random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (path := tmp / "random.nii.gz").write_bytes(gzip.compress(_random_bytes()))
    return Probe(str(path), path)


@probe("nifti", "truncated volume")
def _(tmp: Path, shared: Path) -> Probe:
    path = _truncate(_nifti(tmp / "cut.nii", np.full((40, 40, 40), 100, np.int16)), 0.5)
    return Probe(str(path), path)


@probe("nifti", "zero affine")
def _(tmp: Path, shared: Path) -> Probe:
    path = _nifti(tmp / "zero.nii.gz", np.full((40, 40, 40), 100, np.int16), np.zeros((4, 4)))
    return Probe(str(path), path)


@probe("nifti", "NaN voxels")
def _(tmp: Path, shared: Path) -> Probe:
    volume = np.full((40, 40, 40), 100.0, np.float32)
    volume[1, 2, 3] = np.nan
    path = _nifti(tmp / "nan.nii.gz", volume)
    return Probe(str(path), path)


@probe("nifti", "2-D image")
def _(tmp: Path, shared: Path) -> Probe:
    path = _nifti(tmp / "flat.nii.gz", np.zeros((40, 40), np.float32))
    return Probe(str(path), path)


@probe("nifti", "5-D image")
def _(tmp: Path, shared: Path) -> Probe:
    path = _nifti(tmp / "five.nii.gz", np.zeros((8, 8, 8, 2, 2), np.float32))
    return Probe(str(path), path)


@probe("nifti", "folder with a bad file")
def _(tmp: Path, shared: Path) -> Probe:
    (tmp / "scans").mkdir()
    _nifti(tmp / "scans" / "good.nii.gz", np.full((40, 40, 40), 100, np.int16))
    (bad := tmp / "scans" / "zbad.nii.gz").write_bytes(_random_bytes())
    return Probe(f"nifti:{tmp / 'scans'}", bad)


# ------------------------------------------------------------------------------------------ DICOM


@probe("dicom", "zero-byte file")
def _(tmp: Path, shared: Path) -> Probe:
    (tmp / "series").mkdir()
    (tmp / "series" / "slice.dcm").write_bytes(b"")
    return Probe(f"dicom:{tmp / 'series'}", tmp / "series")


@probe("dicom", "DICM preamble then random bytes")
def _(tmp: Path, shared: Path) -> Probe:
    (tmp / "series").mkdir()
    (tmp / "series" / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM" + _random_bytes(2048))
    return Probe(
        f"dicom:{tmp / 'series'}", "series: no DICOM image found among 1 file(s); skipped non-image DICOM: slice.dcm"
    )


@probe("dicom", "truncated slice")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared)
    return Probe(f"dicom:{folder}", _truncate(files[1], 0.5))


@probe("dicom", "slice header cut short")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared)
    return Probe(f"dicom:{folder}", _truncate(files[1], 0.02))


@probe("dicom", "slice without pixel data")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared)
    dataset = pydicom.dcmread(files[1])
    del dataset.PixelData
    dataset.save_as(files[1])
    return Probe(f"dicom:{folder}", files[1])


@probe("dicom", "Rows disagree with the pixel data")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared, count=1)
    dataset = pydicom.dcmread(files[0])
    dataset.Rows = int(dataset.Rows) * 2
    dataset.save_as(files[0])
    return Probe(f"dicom:{folder}", files[0])


@probe("dicom", "two slices at one position")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared, count=2)
    dataset = pydicom.dcmread(files[0])
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(folder / "copy.dcm")
    return Probe(f"dicom:{folder}", files[0].name)  # the message names both files by name


@probe("dicom", "non-numeric ImagePositionPatient")
def _(tmp: Path, shared: Path) -> Probe:
    folder, files = _series(tmp, shared, count=2)
    dataset = pydicom.dcmread(files[1])
    dataset["ImagePositionPatient"].VR = "LO"
    dataset.ImagePositionPatient = ["a", "b", "c"]
    dataset.save_as(files[1])
    return Probe(f"dicom:{folder}", folder)


# ------------------------------------------------------------------------------------------ IDRiD


@probe("idrid", "empty label CSV")
def _(tmp: Path, shared: Path) -> Probe:
    root = _idrid(tmp, shared)
    (csv := root / "labels" / "train_labels.csv").write_bytes(b"")
    return Probe(f"idrid:{root}", csv, {"image_size": 32})


@probe("idrid", "label CSV in latin-1")
def _(tmp: Path, shared: Path) -> Probe:
    root = _idrid(tmp, shared)
    csv = root / "labels" / "test_labels.csv"
    csv.write_bytes(csv.read_bytes() + "IDRiD_999,é,0\n".encode("latin-1"))
    return Probe(f"idrid:{root}", csv, {"image_size": 32})


@probe("idrid", "grade out of range")
def _(tmp: Path, shared: Path) -> Probe:
    root = _idrid(tmp, shared)
    csv = root / "labels" / "train_labels.csv"
    header, row = csv.read_text().splitlines()
    name, _, rest = row.split(",", 2)
    csv.write_text(f"{header}\n{name},9,{rest}\n")
    return Probe(f"idrid:{root}", csv, {"image_size": 32})


@probe("idrid", "random bytes as JPEG")
def _(tmp: Path, shared: Path) -> Probe:
    root = _idrid(tmp, shared)
    image = next((root / "train_images").iterdir())
    image.unlink()
    image.write_bytes(_random_bytes())
    return Probe(f"idrid:{root}", image, {"image_size": 32})


@probe("idrid", "PNG decompression bomb as JPEG")
def _(tmp: Path, shared: Path) -> Probe:
    root = _idrid(tmp, shared)
    image = next((root / "test_images").iterdir())
    image.unlink()
    return Probe(f"idrid:{root}", _png_bomb(image), {"image_size": 32})


# ------------------------------------------------------------------------------------------ the test


def _outcome(case: Probe) -> str | None:
    """The error message, or None when the dataset loaded and every split's first image decoded."""
    try:
        splits = load_dataset(case.spec, **case.options)
        for images in splits.values():
            images.load(0)
    except MedfoundryError as error:
        return str(error)
    return None


@pytest.mark.parametrize("name", list(PROBES))
def test_malformed_input_gives_one_line_naming_the_file(name: str, tmp_path: Path, shared_data: Path) -> None:
    _, build = PROBES[name]
    case = build(tmp_path, shared_data)
    message = _outcome(case)  # anything but a MedfoundryError escapes and fails the test with its traceback
    assert message is not None, f"{name}: loaded without an error"
    assert "\n" not in message, message
    assert str(case.names) in message, f"{name}: the message does not name {case.names}: {message}"


def test_every_reader_is_probed() -> None:
    """7 readers, 61 probes (csv 15, medmnist 13, nifti 9, dicom 8, folder 6, wsi 5, idrid 5): when written, all 61
    gave one line naming the file; every reader keeps at least three."""
    probed = {reader for reader, _ in PROBES.values()}
    assert probed == set(READERS), f"readers without probes: {sorted(set(READERS) - probed)}"
    per_reader = {reader: sum(r == reader for r, _ in PROBES.values()) for reader in READERS}
    assert min(per_reader.values()) >= 3, per_reader
    assert len(PROBES) >= 61, len(PROBES)


def test_cli_prints_one_line_for_the_reviewed_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's examples through ``medfoundry data info``: a zero affine, negative labels, a PNG bomb."""
    from medfoundry.cli import main

    zero = _nifti(tmp_path / "zero.nii.gz", np.full((40, 40, 40), 100, np.int16), np.zeros((4, 4)))
    negative = _npz(tmp_path / "negative.npz", train_labels=np.array([0, -1, 1, 0]))
    (tmp_path / "bomb").mkdir()
    bomb = _png_bomb(tmp_path / "bomb" / "bomb.png")
    manifest = _manifest(tmp_path / "bomb", ["bomb.png,0"])
    for spec, named in ((zero, zero), (negative, negative), (manifest, bomb)):
        monkeypatch.setattr(sys, "argv", ["medfoundry", "data", "info", str(spec)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
        assert exit_info.value.code == 1 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and str(named) in lines[0], lines


def test_cli_dicom_gap_warning_is_one_line_naming_files(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing slice: one ``warning:`` line (not Python's file:line format) naming the files and where they sort."""
    from medfoundry.cli import main

    files = sorted((shared_data / CT_SERIES).iterdir())
    (folder := tmp_path / "gap").mkdir()
    for file in files[:9] + files[10:]:
        os.symlink(file, folder / file.name)
    monkeypatch.setattr(sys, "argv", ["medfoundry", "data", "info", f"dicom:{folder}"])
    with pytest.raises(SystemExit) as exit_info:  # click ends even a successful command with SystemExit(0)
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code in (0, None), err
    warned = [line for line in err.splitlines() if "missing slice" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), err
    # The neighbours of the removed file, by name and by where they sort (by position: here the reverse of names).
    assert f"file {files[10].name} (slice 10 of 19)" in warned[0], warned
    assert f"file {files[8].name} (slice 11 of 19)" in warned[0], warned
    assert "SliceSpacingWarning" not in err and "warnings.warn" not in err, err


# ------------------------------------------------------------------------------------------ checkpoints


def _checkpoint(tmp: Path) -> Path:
    from medfoundry.models.checkpoint import load_encoder_or_build, save_encoder

    return save_encoder(load_encoder_or_build("vit_tiny_28", in_chans=1, img_size=28), tmp / "ckpt")


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    import json

    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


CHECKPOINT_PROBES: dict[str, Callable[[Path], Path]] = {
    "config.json without model_kwargs": lambda f: _edit_config(f, lambda c: c.pop("model_kwargs")),
    "config.json without architecture": lambda f: _edit_config(f, lambda c: c.pop("architecture")),
    "config.json without normalization": lambda f: _edit_config(f, lambda c: c.pop("normalization")),
    "model_kwargs a list": lambda f: _edit_config(f, lambda c: c.update(model_kwargs=[1, 2])),
    "unknown architecture": lambda f: _edit_config(f, lambda c: c.update(architecture="no_such_net")),
    "config.json a JSON list": lambda f: (f / "config.json").write_text("[1, 2]") and f / "config.json",
    "config.json not JSON": lambda f: (f / "config.json").write_text("{architecture:") and f / "config.json",
    "config.json empty": lambda f: (f / "config.json").write_bytes(b"") or f / "config.json",
    "config.json in latin-1": lambda f: (
        (f / "config.json").write_bytes('{"a": "é"}'.encode("latin-1")) or f / "config.json"
    ),
    "safetensors of random bytes": lambda f: (
        (f / "model.safetensors").write_bytes(_random_bytes()) or f / "model.safetensors"
    ),
    "safetensors empty": lambda f: (f / "model.safetensors").write_bytes(b"") or f / "model.safetensors",
    "safetensors truncated": lambda f: _truncate(f / "model.safetensors"),
    "a pickle named model.safetensors": lambda f: (
        (f / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0]})) or f / "model.safetensors"
    ),
    "only a pickle model.pt": lambda f: (
        (
            (f / "model.safetensors").unlink(),
            (f / "model.pt").write_bytes(pickle.dumps({"weight": [1.0]})),
        )
        and f
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("checkpoint"))


# load_encoder reads a checkpoint inside medfoundry.errors.one_line(folder, "checkpoint", ModelError), so a damaged
# folder is one line whatever the library underneath raised.
def test_malformed_checkpoints_give_one_line(checkpoint: Path, tmp_path: Path) -> None:
    from medfoundry.models.checkpoint import load_encoder

    failures = []
    for name, corrupt in CHECKPOINT_PROBES.items():
        folder = Path(shutil.copytree(checkpoint, tmp_path / name.replace(" ", "_")))
        named = corrupt(folder)
        try:
            load_encoder(folder)
            failures.append(f"{name}: loaded without an error")
        except MedfoundryError as error:
            if "\n" in str(error) or str(named) not in str(error) and str(folder) not in str(error):
                failures.append(f"{name}: {error}")
        except Exception as error:  # noqa: BLE001 - a non-MedfoundryError is exactly what is counted here
            failures.append(f"{name}: {type(error).__name__}: {error}")
    assert not failures, f"{len(failures)} of {len(CHECKPOINT_PROBES)} checkpoint probes: " + "; ".join(failures)
