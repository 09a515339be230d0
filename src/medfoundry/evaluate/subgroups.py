"""Subgroup analysis of a cell's test predictions: every metric per group of a metadata column (site, scanner, sex,
DME risk, bacterial vs viral pneumonia ...) with patient-bootstrap CIs, the worst group, and the gap between the best
and the worst group with its own CI.

The groups are scored on the same resamples of the whole test set's patients: each resample's weights are masked
to one group at a time, so a group's CI and the gap's CI come from one joint bootstrap (the gap's draws are the
difference of the two groups' draws on each resample). A gap whose CI excludes 0 is flagged. A group with fewer
than ``min_group_size`` test cases is reported as too small, never as a number; so is a survival group with fewer
than ``min_group_events`` events (a C-index over a handful of events swings on one patient). A metric undefined on a
group (a group holding one class, for AUROC) is reported as undefined.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.errors import DataError
from medfoundry.evaluate.metrics import (
    LOWER_IS_BETTER,
    METRICS,
    THRESHOLDED_METRICS,
    bootstrap_values,
    decide,
    percentile_interval,
    resample_weights,
)

_BETWEEN_CLASSES = frozenset({"auroc", "f1", "kappa"})
TOO_SMALL = "too_small"
TOO_FEW_EVENTS = "too_few_events"
UNDEFINED = "undefined"
OK = "ok"


@dataclass(frozen=True)
class SubgroupSettings:
    columns: tuple[str, ...]
    min_group_size: int = 10
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    min_group_events: int = 0


def check_subgroups(
    metadata: dict[str, list[str]] | None,
    columns: Sequence[str],
    min_group_size: int,
    source: Path | str | None,
    events: np.ndarray | None = None,
    min_group_events: int = 0,
) -> list[str]:
    """Raise one line naming the file and column when a declared column is missing or has fewer than two groups of
    ``min_group_size`` cases (no gap can be estimated); return a one-line note per group that is too small, or (for
    survival, given ``events``) has fewer than ``min_group_events`` events."""
    found = sorted(metadata or {})
    notes = []
    for column in columns:
        if metadata is None or column not in metadata:
            raise DataError(
                f"subgroup column {column!r} not found in the test cases' metadata; columns found: {found}", source
            )
        names, counts = np.unique(np.asarray(metadata[column]), return_counts=True)
        large = [str(n) for n, c in zip(names, counts, strict=True) if c >= min_group_size]
        if len(large) < 2:
            sizes = ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True))
            raise DataError(
                f"subgroup column {column!r} has fewer than two groups of at least min_group_size={min_group_size} "
                f"test cases ({sizes}); no gap can be estimated",
                source,
            )
        labels = np.asarray(metadata[column])
        happened = None if events is None else np.asarray(events, dtype=bool)
        for name, count in zip(names, counts, strict=True):
            n_events = None if happened is None else int(happened[labels == name].sum())
            status = group_status(int(count), n_events, min_group_size, min_group_events)
            where = f"{source}: subgroup column {column!r}, group {str(name)!r}"
            if status == TOO_SMALL:
                notes.append(
                    f"{where} has {count} test case(s), below min_group_size={min_group_size}: reported as too small"
                )
            elif status == TOO_FEW_EVENTS:
                notes.append(
                    f"{where} has {n_events} event(s) in the test split, below min_group_events={min_group_events}: "
                    "reported as too few events"
                )
    return notes


def group_status(n_cases: int, n_events: int | None, min_group_size: int, min_group_events: int) -> str:
    """Whether a group is scored (OK) or reported as too small or (survival, ``n_events`` given) too few events."""
    if n_cases < min_group_size:
        return TOO_SMALL
    if n_events is not None and n_events < min_group_events:
        return TOO_FEW_EVENTS
    return OK


def _better_sign(metric: str) -> float:
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def _score_groups(
    point_of: Callable[[np.ndarray], float],
    draws_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    groups: np.ndarray,
    names: list[str],
    patient_index: np.ndarray,
    n_patients: int,
    settings: SubgroupSettings,
    events: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Each group's point value, CI and status, and the bootstrap draws of the groups that have a value.

    ``point_of(mask)`` is the metric on one group's cases (NaN: undefined there); ``draws_of(weights, mask)`` its
    values on a batch of patient-resample weight rows restricted to that group; ``events`` (survival) the event
    indicator, whose count per group must reach ``settings.min_group_events``."""
    rows: list[dict[str, Any]] = []
    masks = {name: groups == name for name in names}
    status = {
        name: group_status(
            int(mask.sum()),
            None if events is None else int(events[mask].sum()),
            settings.min_group_size,
            settings.min_group_events,
        )
        for name, mask in masks.items()
    }
    scored = [n for n in names if status[n] == OK]
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in scored}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # A group absent from a resample has no value there: a NaN draw, counted as skipped.
        warnings.simplefilter("ignore", RuntimeWarning)
        for weights in resample_weights(patient_index, n_patients, settings.n_bootstrap, settings.seed):
            for name in scored:
                chunks[name].append(np.asarray(draws_of(weights, masks[name]), dtype=np.float64))
        draws = {name: np.concatenate(chunks[name]) if chunks[name] else np.zeros(0) for name in scored}
        for name in names:
            mask = masks[name]
            row: dict[str, Any] = {"group": name, "n": int(mask.sum()), "n_patients": len(set(patient_index[mask]))}
            if events is not None:
                row["events"] = int(events[mask].sum())
            if name not in scored:
                rows.append({**row, "status": status[name], "value": None, "ci_low": None, "ci_high": None})
                continue
            point = float(point_of(mask))
            if not np.isfinite(point):
                draws.pop(name)
                rows.append({**row, "status": UNDEFINED, "value": None, "ci_low": None, "ci_high": None})
                continue
            value = percentile_interval(point, draws[name], settings.n_bootstrap, settings.confidence)
            rows.append({**row, "status": OK, "value": value.value, "ci_low": value.ci_low, "ci_high": value.ci_high})
    return rows, draws


def subgroup_entry(
    column: str,
    metric: str,
    groups: Sequence[Hashable],
    patient_ids: Sequence[Hashable],
    point_of: Callable[[np.ndarray], float],
    draws_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    settings: SubgroupSettings,
    events: np.ndarray | None = None,
) -> dict[str, Any]:
    """One metric on the groups of one column: the groups' values with CIs, the worst and best group, the gap
    between them with its CI (positive: the best group is better) and whether that CI excludes 0. Any task kind
    whose metric can be computed on a group and on patient-resample weights uses this (``point_of``/``draws_of``
    as in :func:`_score_groups`; ``events`` for survival)."""
    _, patient_index = np.unique(np.asarray([str(p) for p in patient_ids]), return_inverse=True)
    n_patients = int(patient_index.max()) + 1
    labels = np.asarray([str(g) for g in groups])
    names = [str(n) for n in np.unique(labels)]
    event_flags = None if events is None else np.asarray(events, dtype=bool)
    rows, draws = _score_groups(point_of, draws_of, labels, names, patient_index, n_patients, settings, event_flags)
    entry: dict[str, Any] = {"column": column, "metric": metric, "groups": rows}
    valued = [r for r in rows if r["status"] == OK]
    if len(valued) < 2:
        return {**entry, "worst_group": None, "best_group": None, "gap": None, "gap_excludes_zero": False}
    sign = _better_sign(metric)
    worst = min(valued, key=lambda r: sign * r["value"])
    best = max(valued, key=lambda r: sign * r["value"])
    gap_draws = sign * (draws[best["group"]] - draws[worst["group"]])
    gap = percentile_interval(sign * (best["value"] - worst["value"]), gap_draws, settings.n_bootstrap,
                              settings.confidence)  # fmt: skip
    return {
        **entry,
        "worst_group": worst["group"],
        "best_group": best["group"],
        "gap": {"value": gap.value, "ci_low": gap.ci_low, "ci_high": gap.ci_high},
        "gap_excludes_zero": bool(np.isfinite(gap.ci_low) and gap.ci_low > 0),
    }


def subgroup_analysis(
    labels: np.ndarray,
    proba: np.ndarray,
    patient_ids: Sequence[Hashable],
    metadata: dict[str, list[str]],
    metrics: Sequence[str],
    settings: SubgroupSettings,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Classification: one :func:`subgroup_entry` per (column, metric) of a cell's test predictions."""
    y = np.asarray(labels)
    proba = np.asarray(proba, dtype=np.float64)
    decisions = decide(proba, threshold) if threshold is not None else proba
    out = []
    for column in settings.columns:
        for metric in metrics:
            inputs = decisions if metric in THRESHOLDED_METRICS else proba

            def point_of(mask: np.ndarray, metric: str = metric, inputs: np.ndarray = inputs) -> float:
                # F1, kappa or AUROC of a group holding one class compare classes it does not have (F1 of a group
                # of negatives is 0 whatever the model does): undefined, not a low number.
                if y.ndim == 1 and metric in _BETWEEN_CLASSES and np.unique(y[mask]).shape[0] < 2:
                    return float("nan")
                return float(METRICS[metric](y[mask], inputs[mask]))

            def draws_of(weights: np.ndarray, mask: np.ndarray, metric: str = metric,
                         inputs: np.ndarray = inputs) -> np.ndarray:  # fmt: skip
                return bootstrap_values(metric, y, inputs, weights * mask)

            out.append(subgroup_entry(column, metric, metadata[column], patient_ids, point_of, draws_of, settings))
    return out
