"""Cubic crops from DICOM CT series, for 3D SSL pre-training and embedding (``dicom:FOLDER``).

``FOLDER`` is either one series (its files anywhere below it), or a folder whose subfolders each hold one
series (a PACS export: one subfolder per study or patient). Every series is read with
:func:`medfoundry.data.volume.load_dicom_series` (sorted along the slice normal, Hounsfield units, RAS+) and cut
into windowed crops by the NIfTI reader's rules and in its (z, y, x) layout (:mod:`medfoundry.data.nifti`).
The scan name, which becomes the patient id that keeps a scan's crops in one split, is the subfolder's name;
file names and DICOM patient tags are never used, so no identifier leaks into ids, logs or reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfoundry.data.nifti import crop_volumes
from medfoundry.data.sample import Splits
from medfoundry.data.volume import Volume, load_dicom_series
from medfoundry.errors import DataError


def series_folders(path: Path) -> list[Path]:
    """The folders holding one series each: ``path``'s subfolders when they all hold files, else ``path``."""
    if not path.is_dir():
        raise DataError("DICOM folder not found (dicom: takes a folder of slices or of series folders)", path)
    subfolders = sorted(p for p in path.iterdir() if p.is_dir())
    loose_files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if subfolders and not loose_files:
        return subfolders
    return [path]


def load_dicom_crops(
    path: str | Path, *, series_uid: str | None = None, name: str | None = None, **crop: Any
) -> Splits:
    """Crops of every series under ``path`` as ``{"train": set}``; ``crop`` takes the NIfTI reader's crop options
    (``crop_size``, ``stride``, ``window``, ``tissue_hu``, ``min_tissue_fraction``).

    Raises:
        DataError: from the series reader (naming the file or folder), or no crop left.
    """
    path = Path(path)
    folders = series_folders(path)

    def scans() -> Iterator[tuple[str, Volume]]:
        for folder in folders:
            yield (folder.name if folder != path else path.name), load_dicom_series(folder, series_uid=series_uid)

    return crop_volumes(scans(), path, name or path.name, **crop)
