"""Dataset spec strings dispatch to the right reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfoundry.data.manifest import FileImageSet
from medfoundry.data.registry import READERS, load_dataset, register_reader, resolve_reader
from medfoundry.data.sample import ArrayImageSet, Splits
from medfoundry.errors import DataError


def test_npz_by_suffix_and_prefix(breastmnist_npz: Path) -> None:
    by_suffix = load_dataset(breastmnist_npz)
    by_prefix = load_dataset(f"medmnist:{breastmnist_npz}", allow_constant_images=True)
    assert isinstance(by_suffix["train"], ArrayImageSet)
    assert by_suffix["train"].fingerprint() == by_prefix["train"].fingerprint()


def test_folder_and_csv(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "osteosarcoma_tcia_tiles_60" / "test"
    # The osteosarcoma tiles sit in one flat folder, so as an image folder it has no class folders.
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{folder}")
    splits = load_dataset(str(shared_data / "osteosarcoma_tcia_tiles_60" / "labels.csv"), path_column="file")
    assert isinstance(splits["train"], FileImageSet) and len(splits["train"]) == 60
    kermany = load_dataset(shared_data / "kermany_cxr_224_trainsubset")
    assert len(kermany["train"]) == 600


def test_unknown_prefix_and_unknown_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset prefix 'dicomx'.*csv:, dicom:, folder:, idrid:, medmnist:"):
        load_dataset("dicomx:/data/scan")
    odd = tmp_path / "scan.xyz"
    odd.write_text("?")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        load_dataset(odd)
    with pytest.raises(DataError, match="dataset not found"):
        load_dataset(tmp_path / "missing.npz")


def test_register_new_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("medfoundry.data.registry.READERS", dict(READERS))

    # A made-up format (nifti, the docstring's example, is a real reader now).
    @register_reader("testvol", suffixes=(".test.gz",))
    def _read(path: Path, **kwargs: object) -> Splits:
        return {}

    volume = tmp_path / "ct.test.gz"
    volume.write_bytes(b"")
    assert resolve_reader(volume)[0].prefix == "testvol"
    assert resolve_reader("testvol:ct.test.gz")[1] == Path("ct.test.gz")
    with pytest.raises(ValueError):
        register_reader("testvol")(_read)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    assert resolve_reader(scan)[0].prefix == "nifti"
