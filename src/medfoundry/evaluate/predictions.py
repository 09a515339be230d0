"""Per-case predictions on a test set, one CSV file per (model, adapter, label fraction, seed) cell.

results.json holds only metric values; a paired comparison (``medfoundry compare``) needs the predictions
themselves, case by case. The format is a plain CSV so that predictions from any other tool can be compared
with medfoundry's:

* ``id``: a unique sample id (the key two files are aligned on),
* ``patient_id``: the bootstrap resampling unit,
* ``label`` (single-label: an integer class index) or ``label_0`` .. ``label_{K-1}`` (multi-label: 0/1),
* ``proba_0`` .. ``proba_{K-1}``: class probabilities (rows sum to 1) or, for multi-label, per-label ones.

Inside an experiment folder the files live at ``predictions/<model>__<adapter>__<fraction>__<seed>.csv``
(see ``predictions_path``). They hold patient ids, so share them only where the data may be shared.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfoundry.errors import DataError
from medfoundry.io_utils import write_text_atomic


@dataclass
class Predictions:
    """Predictions of one model on one test set; ``source`` is the file they were read from, if any."""

    ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray  # (N,) int class indices, or (N, K) 0/1 for multi-label
    proba: np.ndarray  # (N, K) float
    source: Path | None = None

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def predictions_path(folder: str | Path, model: str, adapter: str, label_fraction: float, seed: int) -> Path:
    """``folder/<model>__<adapter>__<fraction>__<seed>.csv``, with characters unsafe in file names replaced."""
    parts = [_UNSAFE.sub("-", str(p)) for p in (model, adapter, f"{float(label_fraction):g}", int(seed))]
    return Path(folder) / ("__".join(parts) + ".csv")


def _check_shapes(pred: Predictions, where: Path | None) -> None:
    n = len(pred.ids)
    if pred.proba.ndim != 2 or pred.proba.shape[0] != n:
        raise DataError(f"proba must have shape ({n}, K), got {pred.proba.shape}", where)
    if len(pred.patient_ids) != n or pred.labels.shape[0] != n:
        raise DataError(
            f"ids, patient_ids, labels and proba must have the same length "
            f"(got {n}, {len(pred.patient_ids)}, {pred.labels.shape[0]}, {pred.proba.shape[0]})",
            where,
        )
    if pred.labels.ndim == 2 and pred.labels.shape != pred.proba.shape:
        raise DataError(f"multi-label labels {pred.labels.shape} and proba {pred.proba.shape} must match", where)
    seen: set[str] = set()
    duplicates = [i for i in pred.ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if duplicates:
        raise DataError(f"duplicate sample id(s): {_preview(sorted(set(duplicates)))}", where)


def write_predictions(path: str | Path, pred: Predictions) -> Path:
    """Atomically write ``pred`` as CSV (probabilities with full float64 precision)."""
    path = Path(path)
    _check_shapes(pred, path)
    k = pred.proba.shape[1]
    label_cols = [f"label_{j}" for j in range(k)] if pred.multilabel else ["label"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "patient_id", *label_cols, *(f"proba_{j}" for j in range(k))])
    labels = pred.labels.reshape(len(pred.ids), -1).astype(np.int64)
    for i, (sid, pid) in enumerate(zip(pred.ids, pred.patient_ids, strict=True)):
        # repr round-trips a float64 exactly, so a re-read file gives the same metrics.
        writer.writerow([sid, pid, *labels[i].tolist(), *(repr(float(v)) for v in pred.proba[i])])
    return write_text_atomic(path, buffer.getvalue())


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _numbered_columns(header: list[str], prefix: str) -> list[int]:
    """Indices of ``prefix0``, ``prefix1``, ... in ``header``; they must run 0..K-1 without gaps."""
    found = {int(name[len(prefix) :]): i for i, name in enumerate(header) if re.fullmatch(rf"{prefix}\d+", name)}
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"columns {prefix}0..{prefix}{{K-1}} must be numbered without gaps, found {sorted(found)}")
    return [found[j] for j in range(len(found))]


def read_predictions(path: str | Path) -> Predictions:
    """Read and validate a predictions CSV; raises ``DataError`` naming the file, line and problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError("predictions file not found", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read predictions file: {exc}", path) from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise DataError("empty predictions file (expected a header: id,patient_id,label,proba_0,...)", path)
    header = [h.strip() for h in rows[0]]
    try:
        proba_cols = _numbered_columns(header, "proba_")
        multi_cols = _numbered_columns(header, "label_")
    except ValueError as exc:
        raise DataError(str(exc), path) from None
    missing = [c for c in ("id", "patient_id") if c not in header]
    if not multi_cols and "label" not in header:
        missing.append("label (or label_0..label_{K-1})")
    if len(proba_cols) < 2:
        missing.append("proba_0, proba_1, ...")
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; header is {','.join(header)}", path)
    if multi_cols and len(multi_cols) != len(proba_cols):
        raise DataError(f"{len(multi_cols)} label_ columns but {len(proba_cols)} proba_ columns", path)
    label_cols = multi_cols or [header.index("label")]
    id_col, pid_col = header.index("id"), header.index("patient_id")

    ids: list[str] = []
    pids: list[str] = []
    labels: list[list[int]] = []
    proba: list[list[float]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"line {line} has {len(row)} fields, the header has {len(header)}", path)
        try:
            labels.append([int(row[c]) for c in label_cols])
            proba.append([float(row[c]) for c in proba_cols])
        except ValueError as exc:
            raise DataError(f"line {line}: {exc}", path) from None
        if not row[id_col] or not row[pid_col]:
            raise DataError(f"line {line}: id and patient_id must not be empty", path)
        ids.append(row[id_col])
        pids.append(row[pid_col])
    if not ids:
        raise DataError("no predictions (header only)", path)
    label_arr = np.array(labels, dtype=np.int64)
    pred = Predictions(ids, pids, label_arr if multi_cols else label_arr[:, 0], np.array(proba), path)
    _check_shapes(pred, path)
    return pred


def align_predictions(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Reorder ``b`` to ``a``'s sample order after checking both cover the same cases with the same truth.

    Raises ``DataError`` listing ids present in only one set, or ids whose label or patient differs.
    """
    name_a = str(a.source) if a.source else "A"
    name_b = str(b.source) if b.source else "B"
    for pred in (a, b):
        _check_shapes(pred, pred.source)
    index_b = {sid: i for i, sid in enumerate(b.ids)}
    only_a = [sid for sid in a.ids if sid not in index_b]
    set_a = set(a.ids)
    only_b = [sid for sid in b.ids if sid not in set_a]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} id(s) of {name_a} missing from {name_b}: {_preview(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} id(s) of {name_b} missing from {name_a}: {_preview(only_b)}")
        raise DataError("predictions cover different cases; " + "; ".join(parts))
    if a.proba.shape[1] != b.proba.shape[1] or a.labels.ndim != b.labels.ndim:
        raise DataError(
            f"{name_a} has {a.proba.shape[1]} probability columns and {name_b} has {b.proba.shape[1]}"
            if a.proba.shape[1] != b.proba.shape[1]
            else f"one of {name_a} and {name_b} is multi-label and the other is not"
        )
    order = np.array([index_b[sid] for sid in a.ids], dtype=np.int64)
    b_labels = b.labels[order]
    diff_label = [a.ids[i] for i in np.flatnonzero((b_labels != a.labels).reshape(len(a.ids), -1).any(axis=1))]
    if diff_label:
        raise DataError(f"{name_a} and {name_b} disagree on the label of id(s) {_preview(diff_label)}")
    b_pids = [b.patient_ids[i] for i in order]
    diff_pid = [sid for sid, pa, pb in zip(a.ids, a.patient_ids, b_pids, strict=True) if pa != pb]
    if diff_pid:
        raise DataError(f"{name_a} and {name_b} disagree on the patient of id(s) {_preview(diff_pid)}")
    return a, Predictions(list(a.ids), b_pids, b_labels, b.proba[order], b.source)
