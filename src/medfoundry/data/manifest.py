"""Readers for ordinary image files: a CSV manifest or a folder tree with one folder per class.

Both return lazily loaded :class:`FileImageSet` splits; pixels are read with Pillow only when asked for,
so a manifest of many thousands of images opens instantly. A manifest can also cut each image into a grid of
square crops (:class:`CropFileImageSet`), e.g. 1024 px pathology tiles into 224 px model inputs.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfoundry.data.sample import ImageSet, Splits
from medfoundry.errors import DataError, first_line, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT = "train"
DEFAULT_PATIENT_COLUMN = "patient_id"

ImageSize = int | tuple[int, int]

# Pillow modes that hold one grayscale channel at more than 8 bits (16-bit PNG/TIFF, float TIFF).
_HIGH_DEPTH_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def file_list_digest(
    paths: Sequence[Path],
    ids: Sequence[str],
    patient_ids: Sequence[str],
    labels: np.ndarray | None,
    content: bool = False,
) -> Any:
    """A sha256 over each file's path, size and mtime, plus ids and labels; callers add their own options.

    ``content=True`` hashes each file's bytes instead of its path and times, so the digest survives a copy, a
    move or a restore of the files (see :meth:`ImageSet.content_fingerprint`).
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            if content:
                with path.open("rb") as file:
                    digest.update(hashlib.file_digest(file, "sha256").digest())
            else:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError as exc:
            raise DataError("image file is missing or unreadable", path) from exc
    digest.update("\n".join(ids).encode())
    digest.update("\n".join(patient_ids).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).tobytes())
    return digest


class FileImageSet(ImageSet):
    """Images stored as files, read with Pillow on demand as uint8 channels first.

    Grayscale files give 1 channel, colour files 3 (alpha is dropped, palettes are expanded). Images
    deeper than 8 bits are scaled per image from their min-max range to 0-255. ``image_size`` (an int
    for a square, or ``(height, width)``) resizes with bilinear interpolation.
    """

    def __init__(
        self,
        name: str,
        source: Path,
        paths: Sequence[Path],
        ids: list[str],
        patient_ids: list[str],
        labels: np.ndarray | None = None,
        class_names: list[str] | None = None,
        image_size: ImageSize | None = None,
        channels: int | None = None,
    ) -> None:
        if channels not in (None, 1, 3):
            raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels}", source)
        if not (len(paths) == len(ids) == len(patient_ids)) or (labels is not None and len(labels) != len(ids)):
            raise ValueError("paths, ids, patient_ids and labels must have the same length")
        self.name = name
        self.source = source
        self.paths = [Path(p) for p in paths]
        self.ids = ids
        self.patient_ids = patient_ids
        self.labels = labels
        self.class_names = class_names
        self.image_size = _as_hw(image_size)
        self.channels = channels

    def load(self, index: int) -> np.ndarray:
        return read_image(self.paths[index], self.image_size, self.channels)

    def fingerprint(self) -> str:
        """Hash of paths, file sizes, modification times, ids, labels and the resize setting.

        File contents are not hashed here: the caches ask often, and size + mtime changes whenever a file is
        rewritten in practice. :meth:`content_fingerprint` reads the bytes instead.
        """
        return self._digest(file_list_digest(self.paths, self.ids, self.patient_ids, self.labels))

    def content_fingerprint(self) -> str:
        return self._digest(file_list_digest(self.paths, self.ids, self.patient_ids, self.labels, content=True))

    def _digest(self, files: Any) -> str:
        files.update(repr(self.image_size).encode())
        if self.channels is not None:
            files.update(f"channels={self.channels}".encode())
        return files.hexdigest()[:16]


class CropFileImageSet(FileImageSet):
    """Square crops of image files: sample ``i`` is the box ``boxes[i]`` = ``(x, y, side)`` of ``paths[i]``.

    Crops of one file are consecutive, so the last decoded file is kept and each file is decoded once per
    pass. ``image_size`` resizes each crop.
    """

    def __init__(self, *args: Any, boxes: Sequence[tuple[int, int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(boxes) != len(self.ids):
            raise ValueError("boxes must have one entry per sample")
        self.boxes = [tuple(int(v) for v in box) for box in boxes]
        self._last: tuple[Path, Image.Image] | None = None

    def load(self, index: int) -> np.ndarray:
        x, y, side = self.boxes[index]
        return _to_array(self._decoded(self.paths[index]).crop((x, y, x + side, y + side)), self.image_size)

    def _decoded(self, path: Path) -> Image.Image:
        last = self._last  # one read, so a concurrent load cannot swap the pair between check and use
        if last is not None and last[0] == path:
            return last[1]
        image = decode_image(path, self.channels)
        self._last = (path, image)
        return image

    def _digest(self, files: Any) -> str:
        digest = hashlib.sha256(super()._digest(files).encode())
        digest.update(repr(self.boxes).encode())
        return digest.hexdigest()[:16]

    def __getstate__(self) -> dict[str, object]:
        # DataLoader workers started by spawn get a pickled copy; the decoded image need not travel.
        return {**self.__dict__, "_last": None}


def read_image(path: Path, image_size: tuple[int, int] | None = None, channels: int | None = None) -> np.ndarray:
    """Read one image file as uint8 ``(C, H, W)`` with C = 1 (grayscale) or 3 (colour), or as ``channels``."""
    return _to_array(decode_image(path, channels), image_size)


def decode_image(path: Path, channels: int | None = None) -> Image.Image:
    """The decoded file as an 8-bit Pillow image (mode L or RGB, or as ``channels``); DataError naming the file."""
    # Pixels are decoded lazily, after load_dataset has returned, so this is the one-line rule for pixel reads.
    with one_line(path, "image"):
        try:
            with Image.open(path) as image:
                image = _to_8bit(image)
                if channels is not None:
                    # Grey X-rays are often saved as RGB with three equal channels; a 1-channel model wants one.
                    image = image.convert("L" if channels == 1 else "RGB")
                image.load()
                return image
        except FileNotFoundError as exc:
            raise DataError("image file not found", path) from exc
        except Image.DecompressionBombError as exc:
            raise too_large_error(exc, path) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image ({' '.join(str(exc).split())[:200]})", path) from exc


def too_large_error(error: Image.DecompressionBombError, path: Path | None) -> DataError:
    """The one-line error for an image over Pillow's pixel limit (shared by every reader that decodes images)."""
    # Pillow refuses images over 2x its pixel limit before decoding, as a guard against decompression bombs.
    return DataError(
        f"image too large to decode ({first_line(error)}); if it is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
        "or cut it into tiles",
        path,
    )


def _to_array(image: Image.Image, image_size: tuple[int, int] | None) -> np.ndarray:
    if image_size is not None:
        # PIL takes (width, height); image_size is (height, width) like the arrays.
        image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode in _HIGH_DEPTH_GRAY:
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(np.round((values - low) * scale).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_manifest(
    csv_path: str | Path,
    root: Path | None = None,
    *,
    path_column: str = "path",
    label_column: str | None = "label",
    patient_column: str | None = None,
    split_column: str = "split",
    class_name_column: str | None = None,
    image_size: ImageSize | None = None,
    channels: int | None = None,
    crop_size: int | None = None,
    crop_stride: int | None = None,
    patient_regex: str | None = None,
    patient_splits: Mapping[str, Sequence[str] | str] | None = None,
) -> Splits:
    """Load images listed in a CSV with columns ``path,label[,patient_id][,split]``.

    Relative paths are resolved against ``root`` or else the CSV's folder. The sample id is the file
    stem; if two files share a stem, the ids are the relative paths (without suffix) instead, so ids stay
    unique. ``patient_column`` names the patient (or any group) column, e.g. ``source_image_id``; it must
    exist when named, while by default a ``patient_id`` column is used if present. A missing patient column
    (or empty cell) uses the sample id. A missing ``split`` column puts every row in ``train``. Integer
    labels are kept, and ``class_name_column`` (e.g. ``label`` beside ``label_index``) then fills
    ``class_names`` in index order; any other labels are class names, mapped to indices in sorted order and
    stored in ``class_names`` on every split. ``label_column=None`` reads an unlabelled manifest (for
    self-supervised pre-training). ``channels`` (1 or 3) converts every image to grey or RGB; by default each
    file keeps its own.

    ``patient_regex`` derives the patient id from the patient column's value (or from the file stem when there is
    no patient column), as for :func:`load_image_folder`: the named group ``patient`` or the first group that
    matched, e.g. ``^(Case-\\d+|P\\d+)-`` turns the tile id ``Case-3-A15-2939-11262`` into ``Case-3``; a value
    that does not match is kept whole. ``patient_splits`` assigns whole patients to splits instead of a split
    column, e.g. ``{"test": ["Case-4"], "val": ["P9"]}``; every other patient goes to ``train``.

    ``crop_size`` turns each image into the grid of square crops at every ``crop_stride`` pixels (default
    ``crop_size``: non-overlapping); a remainder narrower than a crop at the right or bottom is dropped. Each
    crop is a sample with id ``<image id>@<x>_<y>`` (its top-left corner), the row's label and the row's
    patient id, so crops of one image never straddle splits; ``image_size`` then resizes each crop. Image
    sizes are read from the file headers only.

    Raises:
        DataError: missing file or column, empty or missing-value (``nan``, ``NA``, ...) label cell, empty split
            cell, a path that does not exist, an image smaller than ``crop_size``, class names that disagree with
            the label indices, ``patient_splits`` naming an unknown patient or one patient twice.
    """
    csv_path = Path(csv_path)
    columns, rows = _read_csv(csv_path)
    optional = [c for c in (patient_column, class_name_column) if c]
    required = [path_column] + ([label_column] if label_column else []) + optional
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"missing required column(s) {missing}; columns found: {columns}", csv_path)
    if not rows:
        raise DataError("has a header but no rows", csv_path)

    base = Path(root) if root is not None else csv_path.parent
    paths = [_resolve_row_path(row[path_column], base, line, csv_path) for line, row in _numbered(rows)]
    ids = _unique_ids([row[path_column] for row in rows])
    patient_column = patient_column or DEFAULT_PATIENT_COLUMN
    pattern = _patient_pattern(patient_regex, csv_path)
    cells = [(row.get(patient_column) or "").strip() for row in rows]
    patients = [
        _patient_from_stem(cell or Path(sid).name, pattern, cell or sid) for cell, sid in zip(cells, ids, strict=True)
    ]
    if patient_splits is not None:
        if split_column in columns:
            raise DataError(f"give either a {split_column!r} column or patient_splits, not both", csv_path)
        splits = _splits_by_patient(patients, patient_splits, csv_path)
    else:
        splits = _row_splits(rows, split_column if split_column in columns else None, csv_path)
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    if label_column:
        labels, class_names = _encode_labels([row[label_column] for row in rows], label_column, csv_path)
    if class_name_column:
        class_names = _class_names_by_index(labels, class_names, rows, class_name_column, csv_path)
    # Every other column (site, scanner, sex, stain batch ...) is per-sample metadata that subgroups can name.
    used = {path_column, label_column, patient_column, split_column, class_name_column}
    extra = {column: [(row.get(column) or "").strip() for row in rows] for column in columns if column not in used}
    if crop_size is None:
        if crop_stride is not None:
            raise DataError("crop_stride needs crop_size", csv_path)
        whole = _group_by_split(
            csv_path.stem, csv_path, paths, ids, patients, splits, labels, class_names, image_size, channels
        )
        return _with_metadata(whole, extra, splits)
    grid = [_crop_grid(path, crop_size, crop_stride or crop_size, csv_path) for path in paths]
    rows_of_crops = [row for row, corners in enumerate(grid) for _ in corners]
    boxes = [(x, y, crop_size) for corners in grid for x, y in corners]
    crop_metadata = {column: [values[row] for row in rows_of_crops] for column, values in extra.items()}
    crops = _group_by_split(
        csv_path.stem,
        csv_path,
        [paths[row] for row in rows_of_crops],
        [f"{ids[row]}@{x}_{y}" for row, (x, y, _) in zip(rows_of_crops, boxes, strict=True)],
        [patients[row] for row in rows_of_crops],
        [splits[row] for row in rows_of_crops],
        None if labels is None else labels[rows_of_crops],
        class_names,
        image_size,
        channels,
        boxes,
    )
    return _with_metadata(crops, crop_metadata, [splits[row] for row in rows_of_crops])


def _with_metadata(result: Splits, metadata: dict[str, list[str]], splits: list[str]) -> Splits:
    """Attach each split's rows of the per-sample ``metadata`` columns (in the rows' order, as _group_by_split)."""
    if metadata:
        for split, images in result.items():
            rows = [i for i, s in enumerate(splits) if s == split]
            images.metadata = {column: [values[i] for i in rows] for column, values in metadata.items()}
    return result


def load_image_folder(
    root: str | Path,
    *,
    image_size: ImageSize | None = None,
    channels: int | None = None,
    patient_regex: str | None = None,
    group_regex: str | None = None,
) -> Splits:
    """Load ``root/<class>/*.{png,jpg,jpeg,tif,tiff,bmp}`` or ``root/<split>/<class>/...``.

    The split layout is used when any of ``train``, ``val`` or ``test`` exists under ``root``. Class
    folders are searched recursively; class names are sorted and their positions are the label indices
    (shared by all splits and kept in ``class_names``). Sample ids are the paths relative to the split
    folder without suffix, e.g. ``NORMAL/IM-0115-0001``.

    Without ``patient_regex`` the patient ids equal the sample ids. ``patient_regex`` is searched in each
    file stem (``re.search``: anchor it with ``^``/``$`` as needed); the patient id is its named group
    ``patient`` if it has one, else the first group that took part in the match, e.g.
    ``^(person\\d+|(?:NORMAL2-)?IM-\\d+)[-_]`` for Kermany chest X-rays. Files whose stem does not match
    keep their sample id as patient id. Patient ids carry no class or split folder, so one patient's files
    in several folders share an id.

    ``group_regex`` extracts per-sample metadata for subgroup analyses from each file stem: every named group
    becomes a metadata column, e.g. ``_(?P<pneumonia_type>bacteria|virus)_`` for Kermany's
    ``person1_bacteria_1``; a stem that does not match gets ``none`` in every column.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found" if not root.exists() else "is not a folder", root)
    pattern = _patient_pattern(patient_regex, root)
    split_dirs = _split_dirs(root)
    files = {split: _class_files(folder) for split, folder in split_dirs.items()}
    class_names = sorted({name for per_class in files.values() for name in per_class})
    if not any(paths for per_class in files.values() for paths in per_class.values()):
        layout = "<class>/<image>" if root in split_dirs.values() else "<split>/<class>/<image>"
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in the layout {layout}", root)
    splits: Splits = {}
    for split, per_class in files.items():
        entries = [(path, class_names.index(name)) for name, paths in per_class.items() for path in paths]
        if not entries:
            continue
        paths = [path for path, _ in entries]
        ids = [path.relative_to(split_dirs[split]).with_suffix("").as_posix() for path in paths]
        patients = [_patient_from_stem(path.stem, pattern, sid) for path, sid in zip(paths, ids, strict=True)]
        labels = np.array([label for _, label in entries], dtype=np.int64)
        splits[split] = FileImageSet(
            f"{root.name}:{split}", root, paths, ids, patients, labels, class_names, image_size, channels
        )
        if group_regex is not None:
            splits[split].metadata = _groups_from_stems([path.stem for path in paths], group_regex, root)
    return splits


def _groups_from_stems(stems: list[str], group_regex: str, root: Path) -> dict[str, list[str]]:
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise DataError(f"group_regex {group_regex!r} is not a valid regular expression ({exc})", root) from exc
    if not pattern.groupindex:
        raise DataError(f"group_regex {group_regex!r} needs named groups (?P<column>...) naming its columns", root)
    matches = [pattern.search(stem) for stem in stems]
    return {
        column: [(m[column] if m is not None and m[column] else "none") for m in matches]
        for column in pattern.groupindex
    }


def _patient_pattern(patient_regex: str | None, root: Path) -> re.Pattern[str] | None:
    if patient_regex is None:
        return None
    try:
        pattern = re.compile(patient_regex)
    except re.error as exc:
        raise DataError(f"patient_regex {patient_regex!r} is not a valid regular expression ({exc})", root) from exc
    if pattern.groups == 0:
        raise DataError(f"patient_regex {patient_regex!r} needs a group (...) around the patient id", root)
    return pattern


def _patient_from_stem(stem: str, pattern: re.Pattern[str] | None, sample_id: str) -> str:
    match = pattern.search(stem) if pattern is not None else None
    if match is None:
        return sample_id
    if "patient" in pattern.groupindex:
        return match["patient"] or sample_id
    # With alternatives, (a)|(b), the first group that took part in the match holds the id.
    return next((group for group in match.groups() if group), sample_id)


def _class_names_by_index(
    labels: np.ndarray | None, class_names: list[str] | None, rows: list[dict[str, str]], column: str, csv_path: Path
) -> list[str]:
    """Class names in label-index order from a name column next to integer labels."""
    if labels is None or class_names is not None:
        raise DataError(f"class_name_column {column!r} needs an integer label column", csv_path)
    if labels.min() < 0:
        raise DataError(f"class_name_column {column!r} needs labels 0, 1, 2, ...; found {labels.min()}", csv_path)
    names: dict[int, str] = {}
    for (line, row), label in zip(_numbered(rows), labels.tolist(), strict=True):
        name = (row[column] or "").strip()
        if names.setdefault(label, name) != name:
            raise DataError(f"row {line}: label {label} is named {name!r} here but {names[label]!r} above", csv_path)
    # An index with no rows (a manifest holding a subset of the classes) keeps its number as its name.
    return [names.get(index, str(index)) for index in range(int(labels.max()) + 1)]


def _crop_grid(path: Path, crop_size: int, stride: int, csv_path: Path) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of the crops that fit in the image, row by row."""
    if crop_size < 1 or stride < 1:
        raise DataError(f"crop_size ({crop_size}) and crop_stride ({stride}) must be positive", csv_path)
    width, height = _header_size(path)
    if width < crop_size or height < crop_size:
        raise DataError(f"image is {width}x{height}, smaller than crop_size {crop_size}", path)
    return [(x, y) for y in range(0, height - crop_size + 1, stride) for x in range(0, width - crop_size + 1, stride)]


def _header_size(path: Path) -> tuple[int, int]:
    # Image.open parses the header only; pixels are decoded later, when a crop is loaded.
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        raise too_large_error(exc, path) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image ({' '.join(str(exc).split())[:200]})", path) from exc


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise DataError("CSV manifest not found" if not csv_path.exists() else "is not a file", csv_path)
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports put before the first column name.
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot parse CSV ({' '.join(str(exc).split())[:200]})", csv_path) from exc
    if not header:
        raise DataError("CSV is empty (no header row)", csv_path)
    return header, rows


def _numbered(rows: list[dict[str, str]]) -> list[tuple[int, dict[str, str]]]:
    # Line 1 is the header, so the first data row is line 2, as shown by editors and spreadsheets.
    return [(index + 2, row) for index, row in enumerate(rows)]


def _resolve_row_path(value: str | None, base: Path, line: int, csv_path: Path) -> Path:
    value = (value or "").strip()
    if not value:
        raise DataError(f"row {line}: empty path", csv_path)
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"row {line}: image {path} does not exist", csv_path)
    return path


def _unique_ids(raw_paths: list[str]) -> list[str]:
    """File stems, or relative paths where stems repeat: without the suffix, or with it when ``x.png`` and
    ``x.jpg`` both exist. A file listed twice keeps one id for both rows, so the duplicate is refused later
    (:func:`medfoundry.data.splits.check_disjoint`) instead of passing as two samples."""
    for key in (lambda p: p.stem, lambda p: p.with_suffix("").as_posix(), lambda p: p.as_posix()):
        ids = [key(Path(p.strip())) for p in raw_paths]
        if len(set(ids)) == len(set(Path(p.strip()).as_posix() for p in raw_paths)):
            return ids
    return ids


def _row_splits(rows: list[dict[str, str]], split_column: str | None, csv_path: Path) -> list[str]:
    if split_column is None:
        return [DEFAULT_SPLIT] * len(rows)
    splits = []
    for line, row in _numbered(rows):
        split = (row[split_column] or "").strip()
        if not split:
            raise DataError(f"row {line}: empty {split_column!r} value", csv_path)
        splits.append(split)
    return splits


def _splits_by_patient(
    patients: list[str], patient_splits: Mapping[str, Sequence[str] | str], csv_path: Path
) -> list[str]:
    assigned: dict[str, str] = {}
    for split, members in patient_splits.items():
        if isinstance(members, str):
            members = [members]  # a single patient written without a list in YAML
        for patient in members:
            if assigned.setdefault(str(patient), split) != split:
                raise DataError(
                    f"patient_splits puts patient {patient!r} in both {assigned[str(patient)]!r} and {split!r}",
                    csv_path,
                )
    unknown = sorted(set(assigned) - set(patients))
    if unknown:
        known = sorted(set(patients))
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise DataError(f"patient_splits names patient(s) {unknown} not in the manifest; patients: {shown}", csv_path)
    return [assigned.get(patient, DEFAULT_SPLIT) for patient in patients]


# Cells that spreadsheets and pandas write for a missing value. As labels they would silently become one more
# class (sorted among the real ones), so they are refused like an empty cell.
_MISSING_LABELS = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})


def _encode_labels(values: list[str | None], column: str, csv_path: Path) -> tuple[np.ndarray, list[str] | None]:
    cleaned = [(value or "").strip() for value in values]
    for line, value in enumerate(cleaned, start=2):
        if value.lower() in _MISSING_LABELS:
            shown = f" ({value!r})" if value else ""
            raise DataError(
                f"row {line}: missing label{shown} in column {column!r}; label every row, or read the manifest "
                "unlabelled with label_column=None",
                csv_path,
            )
    try:
        labels = np.array([int(value) for value in cleaned], dtype=np.int64)
    except ValueError:
        class_names = sorted(set(cleaned))
        index = {name: i for i, name in enumerate(class_names)}
        return np.array([index[value] for value in cleaned], dtype=np.int64), class_names
    except OverflowError:
        raise DataError(f"column {column!r} holds an integer too large for a class index", csv_path) from None
    if (labels < 0).any():
        # As in the npz reader: a -1 "unknown" marker would index the last class and break per-class counts.
        line = int(np.flatnonzero(labels < 0)[0]) + 2
        raise DataError(
            f"row {line}: negative label {labels[line - 2]} in column {column!r}; labels must be class indices "
            "0, 1, ... (or class names)",
            csv_path,
        )
    return labels, None


def _group_by_split(
    name: str,
    source: Path,
    paths: list[Path],
    ids: list[str],
    patients: list[str],
    splits: list[str],
    labels: np.ndarray | None,
    class_names: list[str] | None,
    image_size: ImageSize | None,
    channels: int | None = None,
    boxes: list[tuple[int, int, int]] | None = None,
) -> Splits:
    # Known splits come first in their usual order, any custom split names after them.
    order = [s for s in SPLIT_NAMES if s in splits] + sorted(set(splits) - set(SPLIT_NAMES))
    result: Splits = {}
    for split in order:
        rows = [i for i, s in enumerate(splits) if s == split]
        common = dict(
            name=f"{name}:{split}",
            source=source,
            paths=[paths[i] for i in rows],
            ids=[ids[i] for i in rows],
            patient_ids=[patients[i] for i in rows],
            labels=None if labels is None else labels[rows],
            class_names=class_names,
            image_size=image_size,
            channels=channels,
        )
        if boxes is None:
            result[split] = FileImageSet(**common)
        else:
            result[split] = CropFileImageSet(**common, boxes=[boxes[i] for i in rows])
    return result


def _split_dirs(root: Path) -> dict[str, Path]:
    present = {split: root / split for split in SPLIT_NAMES if (root / split).is_dir()}
    if not present:
        return {DEFAULT_SPLIT: root}
    others = sorted(p.name for p in _subdirs(root) if p.name not in SPLIT_NAMES)
    if others:
        raise DataError(
            f"mixes split folders {sorted(present)} with other folders {others}; use either "
            "<class>/ or <split>/<class>/ folders",
            root,
        )
    return present


def _class_files(folder: Path) -> dict[str, list[Path]]:
    return {
        class_dir.name: sorted(
            p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, class_dir)
        )
        for class_dir in _subdirs(folder)
    }


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _visible(path: Path, base: Path) -> bool:
    # Skip hidden files and folders (.DS_Store, .ipynb_checkpoints) that tools leave behind.
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(base).parts)


def _as_hw(image_size: ImageSize | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))
