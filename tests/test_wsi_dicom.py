"""DICOM WSI through wsidicom: a conformant DICOM copy of CMU-1 (built here from its real pixels) reads, tiles and
embeds like the SVS; the non-conformant shared sample is a one-line error and a skip."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from helpers import direct_tile_features
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid
from typer.testing import CliRunner

from medfoundry.cli.wsi import app as wsi_app
from medfoundry.errors import DataError
from medfoundry.models.checkpoint import load_encoder_or_build
from medfoundry.wsi import embed_slides, open_slide, read_patches, tile_slides
from medfoundry.wsi.dicom import DicomSlide
from medfoundry.wsi.tiling import expand_slides

STEM = "CMU-1-Small-Region"
FRAME = 256
MPP = 0.499
MODEL = "vit_tiny_64"  # random weights, seeded: the same network every time it is built


def write_wsi_instance(
    rgb: np.ndarray, path: Path, uids: tuple[str, str, str], spacing_mm: float | None, number: int = 1
) -> Path:
    """One VL Whole Slide Microscopy VOLUME instance: ``rgb`` cut into 256 px frames (TILED_FULL, row-major,
    white padding at the right and bottom edges), stored uncompressed so pixels round-trip exactly."""
    height, width, _ = rgb.shape
    cols, rows = -(-width // FRAME), -(-height // FRAME)
    canvas = np.full((rows * FRAME, cols * FRAME, 3), 255, dtype=np.uint8)
    canvas[:height, :width] = rgb
    frames = canvas.reshape(rows, FRAME, cols, FRAME, 3).swapaxes(1, 2).reshape(-1, FRAME, FRAME, 3)

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality, ds.InstanceNumber = "SM", number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = FRAME
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfOpticalPaths = ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([optical_path])
    shared = Dataset()
    if spacing_mm is not None:
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_mm, height * spacing_mm
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = 0.001
        shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    return shared_data / "wsi_samples" / f"{STEM}.svs"


@pytest.fixture(scope="module")
def level0(svs: Path) -> np.ndarray:
    handle = open_slide(svs)
    try:
        return np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    finally:
        handle.close()


@pytest.fixture(scope="module")
def dicom(level0: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``single``: one level-0 instance (single-file layout); ``folder``: a slide folder with level 0 and a 2x
    box-downsampled level 1 (one instance per level, the usual DICOM WSI layout)."""
    root = tmp_path_factory.mktemp("dicom")
    uids = (generate_uid(), generate_uid(), generate_uid())
    folder = root / "pyramid" / f"{STEM}-dicom"
    folder.mkdir(parents=True)
    write_wsi_instance(level0, folder / "level0.dcm", uids, MPP / 1000, 1)
    write_wsi_instance(np.asarray(Image.fromarray(level0).reduce(2)), folder / "level1.dcm", uids, 2 * MPP / 1000, 2)
    single = root / "single" / f"{STEM}.dcm"
    single.parent.mkdir()
    shutil.copyfile(folder / "level0.dcm", single)
    return {"single": single, "folder": folder}


def test_dicom_slide_reads_like_the_svs(dicom: dict[str, Path], svs: Path, level0: np.ndarray) -> None:
    reference = open_slide(svs)
    slide = open_slide(dicom["folder"])
    try:
        assert isinstance(slide, DicomSlide)
        assert slide.dimensions == reference.dimensions == (2220, 2967)
        assert slide.level_count == 2 and slide.level_dimensions == ((2220, 2967), (1110, 1484))
        assert slide.level_downsamples == (1.0, 2.0)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        for corner, size in [((0, 0), (300, 200)), ((1001, 503), (257, 257)), ((1900, 2700), (256, 256))]:
            ours, theirs = slide.read_region(corner, 0, size), reference.read_region(corner, 0, size)
            assert ours.mode == theirs.mode == "RGBA" and ours.size == size
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))  # uncompressed: exact
        # Past the edge: transparent, as OpenSlide; the part inside is the slide's pixels.
        edge = np.asarray(slide.read_region((2100, 2900), 0, (200, 100)))
        assert np.array_equal(edge, np.asarray(reference.read_region((2100, 2900), 0, (200, 100))))
        assert (edge[:, 120:, 3] == 0).all() and (edge[:67, :120, 3] == 255).all()
        # Level 1 in level-0 coordinates: (1000, 600) is pixel (500, 300) of the 2x level.
        half = np.asarray(Image.fromarray(level0).reduce(2))
        region = np.asarray(slide.read_region((1000, 600), 1, (128, 96)).convert("RGB"))
        assert np.array_equal(region, half[300:396, 500:628])
        thumbnail = slide.get_thumbnail((512, 512))
        assert thumbnail.mode == "RGB" and thumbnail.size == reference.get_thumbnail((512, 512)).size
        reopened = pickle.loads(pickle.dumps(slide))  # what a DataLoader worker gets: the slide opened again
        assert reopened.level_dimensions == slide.level_dimensions
        reopened.close()
    finally:
        slide.close()
        reference.close()
    single = open_slide(dicom["single"])
    assert (single.level_count, single.dimensions) == (1, (2220, 2967))
    single.close()


def _same_tiles(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two tile sets."""
    first, second = {tuple(c) for c in a}, {tuple(c) for c in b}
    return len(first & second) / len(first | second)


def test_tiles_match_the_svs(dicom: dict[str, Path], svs: Path, tmp_path: Path) -> None:
    # At 1 um/px the slide folder reads its 2x level (the SVS has only level 0).
    for mpp, tile, dicom_level in [(0.5, 224, 0), (1.0, 112, 1)]:
        out = tmp_path / f"mpp{mpp}"
        summary = tile_slides([svs, dicom["folder"]], out, mpp=mpp, tile_size=tile)
        assert len(summary.done) == 2 and not summary.skipped, summary.skipped
        # The single file shares the SVS's stem, so it goes to its own folder.
        assert tile_slides([dicom["single"]], out / "single", mpp=mpp, tile_size=tile).ok
        svs_coords, svs_attrs = read_patches(out / "patches" / f"{STEM}.h5")
        single_coords, single_attrs = read_patches(out / "single" / "patches" / f"{STEM}.h5")
        folder_coords, folder_attrs = read_patches(out / "patches" / f"{STEM}-dicom.h5")  # named by the folder
        # Same pixels and the same thumbnail recipe as OpenSlide: the very same grid and attributes.
        assert len(svs_coords) > 10 and np.array_equal(single_coords, svs_coords)
        single_attrs.pop("slide_path"), svs_attrs.pop("slide_path")
        # CLAM's dimension attributes are arrays: compare values, not array identities.
        assert {k: np.asarray(v).tolist() for k, v in single_attrs.items()} == {
            k: np.asarray(v).tolist() for k, v in svs_attrs.items()
        }
        # The folder's tissue mask comes from its 2x level (as OpenSlide would use a pyramid's): near-identical.
        assert _same_tiles(folder_coords, svs_coords) > 0.9
        assert (folder_coords % svs_attrs["patch_size_level0"] == 0).all()
        assert folder_attrs["level0_mpp"] == pytest.approx(MPP) and folder_attrs["level"] == dicom_level
        assert folder_attrs["patch_size_level0"] == svs_attrs["patch_size_level0"]
        assert folder_attrs["slide_path"] == str(dicom["folder"].resolve())
        assert (out / "thumbnails" / f"{STEM}-dicom.png").is_file()


def test_embedding_matches_the_svs(dicom: dict[str, Path], svs: Path, tmp_path: Path) -> None:
    # 2 um/px, 64 px tiles: about 30 tissue tiles per slide, read in 2 DataLoader workers that each reopen the
    # DICOM slide. The single file reads level 0 as the SVS does; the slide folder reads its 2x level.
    out = tmp_path / "work"
    assert len(tile_slides([dicom["single"], dicom["folder"]], out, mpp=2.0, tile_size=64).done) == 2
    summary = embed_slides(
        out / "patches",
        MODEL,
        out / "features",
        slides=[dicom["single"], dicom["folder"]],
        batch_size=8,
        num_workers=2,
        progress=False,
    )
    assert sorted(row["slide"] for row in summary.done) == [STEM, f"{STEM}-dicom"] and not summary.failed
    encoder = load_encoder_or_build(MODEL, in_chans=3, img_size=None).eval()
    for stem, reference, level in [(STEM, svs, 0), (f"{STEM}-dicom", dicom["folder"], 1)]:
        with h5py.File(out / "features" / f"{stem}.h5", "r") as h5:
            coords, features = h5["coords"][()], h5["features"][()]
            assert int(h5.attrs["level"]) == level and len(coords) > 10
        # The single DICOM's features against tiles read from the SVS itself; the folder's against its own tiles.
        expected = direct_tile_features(encoder, reference, out / "patches" / f"{stem}.h5")
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_nonconformant_dicom_is_one_clear_line_and_skipped(
    shared_data: Path, dicom: dict[str, Path], tmp_path: Path
) -> None:
    sample = shared_data / "wsi_samples" / "small_dicom.dcm"
    with pytest.raises(DataError) as error:
        open_slide(sample)
    message = str(error.value)
    assert message.startswith(f"{sample}: not a readable DICOM WSI") and "\n" not in message
    assert "no VOLUME image level (ImageType absent)" in message and "no pixel spacing" in message
    assert "no frame positions" in message
    # A folder run (the shared samples: the SVS and this DICOM) plus the DICOM slide folder: both slides are
    # tiled, the sample is listed as skipped with its reason, and the run succeeds.
    out = tmp_path / "out"
    result = CliRunner().invoke(
        wsi_app, ["tile", str(sample.parent), str(dicom["folder"].parent), "--out", str(out), "--mpp", "2.0",
                  "--tile", "64"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "tile_summary.json").read_text())
    assert sorted(Path(d["slide"]).name for d in summary["done"]) == [f"{STEM}-dicom", f"{STEM}.svs"]
    assert [(Path(s["slide"]).name, "no VOLUME image level" in s["reason"]) for s in summary["skipped"]] == [
        ("small_dicom.dcm", True)
    ]
    assert "skipped" in result.output and "small_dicom.dcm" in result.output


def test_dicom_without_pixel_spacing_and_folder_layouts(
    level0: np.ndarray, dicom: dict[str, Path], tmp_path: Path
) -> None:
    uids = (generate_uid(), generate_uid(), generate_uid())
    nospacing = write_wsi_instance(level0[:512, :512], tmp_path / "nospacing.dcm", uids, None)
    assert pydicom.dcmread(nospacing, stop_before_pixels=True).ImageType[2] == "VOLUME"
    with pytest.raises(DataError, match=r"nospacing\.dcm: not a readable DICOM WSI .*no pixel spacing"):
        open_slide(nospacing)
    # A slide folder is one slide, given itself or found inside a folder of slides; a lone .dcm is a file slide.
    folder = dicom["folder"]
    assert expand_slides([folder]) == [folder] and expand_slides([folder.parent]) == [folder]
    assert expand_slides([dicom["single"].parent]) == [dicom["single"]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .dcm files"):
        open_slide(empty)
