"""Write our features in the layouts CLAM, TRIDENT and eva read (``medfoundry wsi export-features``).

Sources are slide feature folders written by ``medfoundry wsi embed`` (``<slide>.h5`` with ``features``,
``coords`` and attributes) or image feature files written by ``medfoundry embed`` (``features``, ``ids``,
``patient_ids``, ``labels``). The layouts, as their readers open them:

* ``clam`` (mahmoodlab/CLAM): ``h5_files/<slide>.h5`` (``features`` N x D float32, ``coords`` N x 2 with the
  attributes ``create_patches_fp.py`` writes: ``patch_level``, ``patch_size`` in pixels *at* ``patch_level``,
  ``downsample``, ``level_dim``, ``downsampled_level_dim``, ``name``) and ``pt_files/<slide>.pt`` (a plain tensor,
  loadable with ``torch.load(weights_only=True)``), read by ``Generic_MIL_Dataset``; with ``--labels``, also
  ``dataset.csv`` (``case_id,slide_id,label``) and, when the labels have splits, ``splits_0.csv``
  (``train,val,test`` columns of slide ids), as CLAM's ``main.py`` reads them.
* ``trident`` (mahmoodlab/TRIDENT): ``features_<encoder>/<slide>.h5`` with ``features``, ``coords`` and the
  patches file's attributes on ``coords`` (``patch_size`` is the output size, ``patch_size_level0``, ...).
* ``eva`` (kaiko-ai/eva): ``manifest.csv`` with ``origin,embeddings,target,split`` (``embeddings`` relative to the
  output folder) and per-sample ``.pt`` tensors under ``embeddings/``. Image features give one row and one [D]
  tensor per image (``EmbeddingsClassificationDataset``); slides give one row and one N x D tensor per slide plus
  ``wsi_id`` (``MultiEmbeddingsClassificationDataset``'s default ``multi_id`` column). eva wants integer targets:
  string labels become their index in sorted order, written to ``classes.json``.

Files are written atomically; an output file already present is replaced.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medfoundry.errors import DataError
from medfoundry.io_utils import atomic_path, write_json_atomic

LAYOUTS = ("clam", "eva", "trident")
EVA_SPLITS = ("train", "val", "test")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SlideFeatures:
    """One slide's features file from ``wsi embed`` (or TRIDENT), read whole."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]  # the file's
    coords_attrs: dict[str, Any]  # on ``coords``: the patches file's, when ``wsi embed`` copied them
    path: Path


@dataclass
class ImageFeatures:
    """One split of image features from ``medfoundry embed``."""

    split: str
    features: np.ndarray
    ids: list[str]
    labels: np.ndarray | None
    path: Path


@dataclass
class ExportSummary:
    layout: str
    out_dir: Path
    written: list[Path] = field(default_factory=list)
    samples: int = 0


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}


def read_slide_features(path: Path) -> SlideFeatures:
    try:
        with h5py.File(path, "r") as h5:
            features = np.asarray(h5["features"][()], dtype=np.float32)
            coords = np.asarray(h5["coords"][()], dtype=np.int64)
            attrs, coords_attrs = _plain(dict(h5.attrs)), _plain(dict(h5["coords"].attrs))
    except (OSError, KeyError) as error:
        raise DataError(f"not a slide features file with 'features' and 'coords' ({error})", path) from None
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise DataError(f"features {features.shape} and coords {coords.shape} do not match (N x D, N x 2)", path)
    return SlideFeatures(Path(path).stem, features, coords, attrs, coords_attrs, Path(path))


def read_image_features(path: Path, split: str | None = None) -> ImageFeatures:
    from medfoundry.models.features import read_embeddings

    embeddings, _ = read_embeddings(path)
    name = split or Path(path).stem
    return ImageFeatures(name, embeddings.features, list(embeddings.ids), embeddings.labels, Path(path))


def _kind(path: Path) -> str:
    try:
        with h5py.File(path, "r") as h5:
            if "coords" in h5:
                return "slide"
            if "ids" in h5:
                return "image"
    except OSError as error:
        raise DataError(f"not an HDF5 features file ({error})", path) from None
    raise DataError("neither slide features (features, coords) nor image features (features, ids)", path)


def collect_sources(sources: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Slide and image feature files among ``sources`` (files, or folders of ``<slide>.h5``)."""
    slides: list[Path] = []
    images: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files = sorted(p for p in source.glob("*.h5") if not p.name.startswith("."))
            if not files:
                raise DataError("no .h5 features files in this folder", source)
        elif source.is_file():
            files = [source]
        else:
            raise DataError("features file or folder not found", source)
        for path in files:
            (slides if _kind(path) == "slide" else images).append(path)
    if slides and images:
        raise DataError("give slide features or image features, not both", images[0])
    return slides, images


def encoder_folder_name(attrs: dict[str, Any]) -> str:
    """TRIDENT's ``features_<encoder>``: the encoder's name, or a checkpoint folder's last part, made file-safe."""
    name = str(attrs.get("encoder") or "encoder").rstrip("/\\")
    return _UNSAFE.sub("_", Path(name).name) or "encoder"


def clam_coords_attrs(item: SlideFeatures) -> dict[str, Any]:
    """The ``coords`` attributes CLAM reads, in CLAM's meaning (``patch_size``: pixels read at ``patch_level``)."""
    ours = {**item.attrs, **item.coords_attrs}
    level = int(ours.get("patch_level", ours.get("level", 0)))
    patch_size = int(ours.get("patch_size", 0))
    size0 = int(ours.get("patch_size_level0", patch_size))
    downsample = np.atleast_1d(np.asarray(ours.get("downsample", ours.get("level_downsample", 1.0)), dtype=float))
    read_size = int(ours.get("read_size", max(1, round(size0 / float(downsample[0])))))
    attrs: dict[str, Any] = {
        "patch_level": level,
        "patch_size": read_size,
        "downsample": np.resize(downsample, 2),
        "name": item.slide_id,
        # Not CLAM's: the size tiles were resized to before the encoder (CLAM's target_patch_size).
        "target_patch_size": patch_size,
    }
    for key in ("level_dim", "downsampled_level_dim"):
        if key in ours:
            attrs[key] = np.asarray(ours[key], dtype=np.int64)
        elif "level0_width" in ours:
            dims = np.array([ours["level0_width"], ours["level0_height"]], dtype=float) / float(downsample[0])
            attrs[key] = np.round(dims).astype(np.int64)
    return attrs


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, coords_attrs: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        dataset = h5.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in coords_attrs.items():
            dataset.attrs[key] = value
    return path


def _save_tensor(path: Path, array: np.ndarray) -> Path:
    import torch

    # A plain tensor (no dict, no pickled classes): it loads with torch.load(weights_only=True).
    with atomic_path(path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), tmp)
    return path


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:  # noqa: PTH123
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _integer_targets(labels: Sequence[Any]) -> tuple[list[int], list[str] | None]:
    """Integer targets for eva; string labels become their index in sorted order (returned as classes)."""
    try:
        return [int(str(v)) for v in labels], None
    except ValueError:
        classes = sorted({str(v) for v in labels})
        return [classes.index(str(v)) for v in labels], classes


def export_slides(
    files: Sequence[Path], out_dir: Path, layout: str, labels_csv: Path | None = None, encoder_name: str | None = None
) -> ExportSummary:
    """Slide features in CLAM's, TRIDENT's or eva's layout (module docstring)."""
    summary = ExportSummary(layout, out_dir)
    label_rows = _label_rows(labels_csv, [Path(f).stem for f in files]) if labels_csv is not None else None
    if layout == "eva" and label_rows is None:
        raise DataError("eva's manifest needs a target per slide: give --labels (slide_id,patient_id,label[,split])")
    manifest: list[list[Any]] = []
    for path in files:
        item = read_slide_features(path)
        if layout == "clam":
            summary.written.append(
                _write_h5(
                    out_dir / "h5_files" / f"{item.slide_id}.h5", item.features, item.coords, clam_coords_attrs(item)
                )
            )
            summary.written.append(_save_tensor(out_dir / "pt_files" / f"{item.slide_id}.pt", item.features))
        elif layout == "trident":
            folder = out_dir / f"features_{encoder_name or encoder_folder_name(item.attrs)}"
            coords_attrs = item.coords_attrs or {
                k: item.attrs[k]
                for k in ("patch_size", "patch_size_level0", "level", "mpp", "slide")
                if k in item.attrs
            }
            summary.written.append(_write_h5(folder / f"{item.slide_id}.h5", item.features, item.coords, coords_attrs))
        else:
            relative = f"embeddings/{item.slide_id}.pt"
            summary.written.append(_save_tensor(out_dir / relative, item.features))
            row = label_rows[item.slide_id]  # type: ignore[index] - checked above
            manifest.append([item.slide_id, relative, row.label, row.split or "", item.slide_id])
        summary.samples += 1
    if layout == "eva":
        targets, classes = _integer_targets([row[2] for row in manifest])
        for row, target in zip(manifest, targets, strict=True):
            row[2] = target
        header = ("origin", "embeddings", "target", "split", "wsi_id")
        summary.written.append(_write_csv(out_dir / "manifest.csv", header, manifest))
        if classes is not None:
            summary.written.append(write_json_atomic(out_dir / "classes.json", {"classes": classes}))
    elif layout == "clam" and label_rows is not None:
        rows = [label_rows[Path(f).stem] for f in files]
        summary.written.append(
            _write_csv(
                out_dir / "dataset.csv",
                ("case_id", "slide_id", "label"),
                [(r.patient_id, r.slide_id, r.label) for r in rows],
            )
        )
        if any(r.split for r in rows):
            columns = [[r.slide_id for r in rows if r.split == name] for name in ("train", "val", "test")]
            length = max(len(c) for c in columns)
            table = [[c[i] if i < len(c) else "" for c in columns] for i in range(length)]
            summary.written.append(_write_csv(out_dir / "splits_0.csv", ("train", "val", "test"), table))
    return summary


def _label_rows(labels_csv: Path, slide_ids: Sequence[str]) -> dict[str, Any]:
    from medfoundry.mil.data import read_label_rows

    rows = {row.slide_id: row for row in read_label_rows(labels_csv)}
    missing = [s for s in slide_ids if s not in rows]
    if missing:
        raise DataError(
            f"no label for slide(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}", labels_csv
        )
    return rows


def export_images(files: Sequence[Path], out_dir: Path, split: str | None = None) -> ExportSummary:
    """Image features (one file per split) as eva's patch-level embeddings: manifest.csv and one [D] tensor each."""
    summary = ExportSummary("eva", out_dir)
    if split is not None and len(files) > 1:
        raise DataError("--split names the split of one file; give one file, or name files train/val/test.h5")
    manifest: list[list[Any]] = []
    for path in files:
        item = read_image_features(path, split)
        if item.split not in EVA_SPLITS:
            raise DataError(f"split {item.split!r} from the file name; name it train/val/test.h5 or give --split", path)
        if item.labels is None:
            raise DataError("image features without labels; eva's manifest needs a target per image", path)
        names: set[str] = set()
        for row, (image_id, label, vector) in enumerate(zip(item.ids, item.labels, item.features, strict=True)):
            name = _UNSAFE.sub("_", image_id).strip("._") or "image"
            if name in names:  # two ids equal once made file-safe
                name = f"{name}_{row}"
            names.add(name)
            relative = f"embeddings/{item.split}/{name}.pt"
            summary.written.append(_save_tensor(out_dir / relative, vector))
            manifest.append([image_id, relative, label.item() if isinstance(label, np.generic) else label, item.split])
        summary.samples += len(item.ids)
    targets, classes = _integer_targets([row[2] for row in manifest])
    for row, target in zip(manifest, targets, strict=True):
        row[2] = target
    summary.written.append(_write_csv(out_dir / "manifest.csv", ("origin", "embeddings", "target", "split"), manifest))
    if classes is not None:
        summary.written.append(write_json_atomic(out_dir / "classes.json", {"classes": classes}))
    return summary


def export_features(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    layout: str,
    labels_csv: str | Path | None = None,
    split: str | None = None,
    encoder_name: str | None = None,
) -> ExportSummary:
    """Convert ``sources`` (slide feature folders or image feature files) into ``layout`` under ``out_dir``."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    slides, images = collect_sources(sources)
    out = Path(out_dir)
    if images:
        if layout != "eva":
            raise DataError(
                f"image features have no {layout} layout ({layout} reads slides); use --layout eva", images[0]
            )
        return export_images(images, out, split)
    return export_slides(slides, out, layout, Path(labels_csv) if labels_csv else None, encoder_name)
