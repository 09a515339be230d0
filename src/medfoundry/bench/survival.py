"""The survival task kind: Cox models on patient-level features, scored by C-index and time-dependent AUC with
patient-bootstrap CIs, compared with a clinical baseline (stage alone) on the same patients.

How time-to-event maps onto the engine's cells:

* a task is a CSV (``source``) with one row per patient: a patient id, a time, an event (1 = event, 0 = censored)
  and feature columns (named in ``survival.feature_columns``, or every numeric column but the others), or an
  embeddings ``.h5`` (``survival.embeddings``, from ``medfoundry embed``) whose rows are averaged per patient and
  joined to the CSV by patient id. The task is *precomputed*: no encoder runs, and its cells are named after the
  features file, which stands for the model that made the features;
* **splits**: a ``split_column`` fixes train / test (``val`` rows join train: the penalty is chosen by
  cross-validation inside the training subset, so no separate validation split is needed); without it the test
  split is carved by patient, stratified on the event, and no patient is in two splits;
* or a folder of slide bags (``survival.bags``: one ``.h5`` of tile features per slide, from ``medfoundry wsi
  embed``), joined to the CSV by patient (``survival.slides`` maps slide ids to patients; without it each file is
  ``<patient>.h5``); a patient's slides make one bag, and the mean of its tiles is the patient's feature vector;
* the adapters (``survival.adapters``): ``coxph``, a Cox proportional-hazards model with an elastic-net penalty on
  standardised features (coxnet), its penalty chosen by event-stratified cross-validation on Harrell's C inside
  the cell's training subset; ``deep-cox``, a small MLP trained on the Cox partial likelihood, early-stopped on a
  patient-grouped, event-stratified part of the cell's training subset; and on bags ``mil-<model>`` (``mil-abmil``,
  ``mil-mean``, ...), the slide-mil kind's heads with the same loss. ``grid_cells`` crosses them with the suite's
  label fractions (a fraction draws an event-stratified subset of the training patients, nested per seed) and
  seeds (which also draw the cross-validation folds and initialise the networks);
* the baseline (``baseline_features``, e.g. clinical stage, as ordinal numbers or one-hot) is ``coxph`` on those
  columns only, on the same subsets, recorded as the model ``baseline_name`` ("stage-only"); and, unless
  ``combined: false``, the vector adapters also fit features plus those columns (model ``<features>+<columns>``),
  asking whether the features add to stage; patients missing any used column are left out of all of them, so every
  model is scored on exactly the same test patients;
* the scorer reports Harrell's C (headline), Uno's C and the cumulative/dynamic AUC at each of ``horizons``, all
  with patient-bootstrap CIs; predictions are saved as id, patient_id, time, event, risk;
* comparisons: every other model and adapter against the baseline on Harrell's C, a paired patient bootstrap
  averaged over seeds, per label fraction; and Kaplan-Meier curves of the test patients split at the median
  predicted risk, with a log-rank test, kept in the task's metadata so the report draws them from results.json.

The statistics come from scikit-survival: its concordance indices, IPCW weighting and coxnet path are maintained,
tested against the reference R implementations, and follow scikit-learn's estimator API like our adapters, which
lifelines (its own fitter API, no Uno's C over a coxnet path) and torchsurv (deep models only) do not; the deep
heads' loss is the Breslow partial likelihood in ``mil/train.py: cox_loss`` (why not torchsurv's: there).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from medfoundry.bench.grid import Cell, LabelBudgets, grid_cells
from medfoundry.bench.kinds import TASK_KINDS, EngineContext, TaskKind
from medfoundry.bench.task_parts import ConfiguredTask, KindScorer
from medfoundry.errors import DataError, MedfoundryError
from medfoundry.evaluate.cells import CellKey, CellOutput, CellStore
from medfoundry.evaluate.compare import share_opposite
from medfoundry.evaluate.metrics import MetricValue, percentile_interval, resample_weights
from medfoundry.evaluate.subgroups import SubgroupSettings, check_subgroups, subgroup_entry
from medfoundry.extras import require
from medfoundry.io_utils import write_text_atomic
from medfoundry.mil.models import MIL_MODELS
from medfoundry.mil.train import MILTrainConfig
from medfoundry.settings import StrictModel

if TYPE_CHECKING:
    # Annotations only: config.py imports this module to validate a task's survival section.
    from medfoundry.config import EncoderConfig, EvaluateConfig, SuiteConfig, TaskConfig

KIND = "survival"
ADAPTER = "coxph"  # the reference adapter: coxnet, and the only one the baseline runs
DEEP_COX = "deep-cox"
MIL_PREFIX = "mil-"
HEADLINE = "c_index"
ROLES = ("train", "test")


def _deep_cox_defaults() -> MILTrainConfig:
    # A few hundred patients of 10-1000 features: a narrow MLP, whole-cohort-sized batches (the partial likelihood
    # compares each patient with the others at risk in the batch), early stopping from epoch 10.
    return MILTrainConfig(hidden=32, dropout=0.1, lr=1e-3, max_epochs=200, patience=20, min_epochs=10, batch_size=64)


def _mil_cox_defaults() -> MILTrainConfig:
    return MILTrainConfig(batch_size=16, max_epochs=60, patience=10, min_epochs=10)


class SurvivalConfig(StrictModel):
    """A survival task's ``survival:`` section: which columns hold what, the baseline, the horizons, the Cox fit."""

    time_column: str = Field(description="time to event or censoring (non-negative, any unit)")
    event_column: str = Field(description="1 = event observed, 0 = censored")
    patient_column: str = Field(description="patient id; one row per patient")
    feature_columns: list[str] | None = Field(
        None, description="feature columns; default every numeric column but time, event, split and baseline"
    )
    embeddings: str | None = Field(
        None, description="an embeddings .h5 (medfoundry embed) used as features, averaged per patient"
    )
    split_column: str | None = Field(None, description="train / val / test per row; else test carved by patient")
    features_name: str | None = Field(None, description="model name of the feature cells; default the file's stem")
    baseline_features: list[str] = Field(default_factory=list, description="columns of a clinical baseline model")
    baseline_name: str = "stage-only"
    horizons: dict[str, float] = Field(
        default_factory=dict, description="time-dependent AUC at these times (name: time in the time column's unit)"
    )
    tau: float | None = Field(None, gt=0, description="Uno's C truncation time; default the largest horizon")
    l1_ratio: float = Field(0.5, gt=0, le=1)
    n_alphas: int = Field(30, ge=2)
    cv_folds: int = Field(5, ge=2)
    adapters: list[str] = Field(
        default_factory=lambda: [ADAPTER],
        min_length=1,
        description="coxph (coxnet), deep-cox (MLP, Cox loss), mil-<model> on bags (mil-abmil, mil-mean, ...)",
    )
    baseline_encoding: Literal["ordinal", "onehot"] = Field(
        "ordinal", description="baseline columns as numbers, or one indicator per value (the lowest left out)"
    )
    combined: bool = Field(True, description="also fit features plus the baseline columns (do features add?)")
    combined_name: str | None = Field(None, description="model name of features + baseline; default <features>+<cols>")
    deep_cox: MILTrainConfig = Field(default_factory=_deep_cox_defaults, description="deep-cox MLP training")
    bags: str | None = Field(None, description="folder of per-slide tile-feature .h5 files (medfoundry wsi embed)")
    slides: str | None = Field(None, description="CSV slide_id,patient_id for bags; default files <patient>.h5")
    mil_train: MILTrainConfig = Field(default_factory=_mil_cox_defaults, description="mil-<model> training")

    @field_validator("adapters")
    @classmethod
    def _known_adapters(cls, names: list[str]) -> list[str]:
        for name in names:
            mil = name.removeprefix(MIL_PREFIX) if name.startswith(MIL_PREFIX) else None
            if name not in (ADAPTER, DEEP_COX) and (mil is None or mil not in MIL_MODELS):
                known = [ADAPTER, DEEP_COX, *(MIL_PREFIX + m for m in MIL_MODELS.names())]
                raise ValueError(f"unknown survival adapter {name!r}; known: {', '.join(known)}")
        return list(dict.fromkeys(names))

    @field_validator("deep_cox", "mil_train")
    @classmethod
    def _batches(cls, train: MILTrainConfig) -> MILTrainConfig:
        if train.batch_size < 2:
            raise ValueError("batch_size must be at least 2: the Cox loss compares patients within a batch")
        return train


def _metric_names(settings: SurvivalConfig) -> list[str]:
    return [HEADLINE, "uno_c", *(f"auc_{name}" for name in settings.horizons)]


@dataclass
class SurvivalData:
    """Complete cases of one survival table, aligned row by row."""

    patients: list[str]
    time: np.ndarray
    event: np.ndarray  # bool
    features: np.ndarray
    feature_names: list[str]
    baseline: np.ndarray | None
    split: list[str | None]
    dropped: int
    baseline_names: list[str] = field(default_factory=list)
    # Each patient's tiles (all their slides), when the task reads slide bags.
    bags: list[np.ndarray] | None = None
    # The task's subgroup columns (site, sex, MSI status ...), as text; an empty cell is the group "missing".
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SurvivalCases:
    """The test patients a cell is scored on."""

    ids: list[str]
    patient_ids: list[str]
    time: np.ndarray
    event: np.ndarray
    metadata: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SurvivalTask(ConfiguredTask):
    config: TaskConfig
    settings: SurvivalConfig
    data: SurvivalData
    splits: dict[str, np.ndarray]
    metrics: list[str]
    carved: list[str] = field(default_factory=list)
    kind: str = KIND
    precomputed: bool = True
    # Kaplan-Meier curves of the predicted risk groups, per model, filled in after the cells ran (comparisons).
    risk_groups: dict[str, Any] = field(default_factory=dict)
    # Harrell's C per subgroup of config.subgroups, filled in after the cells ran; notes on groups too small.
    subgroups: dict[str, Any] = field(default_factory=dict)
    subgroup_notes: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        s = self.settings
        if s.features_name:
            return s.features_name
        return Path(s.bags).name if s.bags else Path(s.embeddings or str(self.config.source)).stem

    @property
    def combined_name(self) -> str | None:
        """The features-plus-baseline model, when the task has a baseline and fits it."""
        if self.data.baseline is None or not self.settings.combined:
            return None
        return self.settings.combined_name or f"{self.model_name}+{'+'.join(self.settings.baseline_features)}"

    def adapters(self, model: str) -> list[str]:
        """The adapters a model runs: the baseline only coxph, the combined model the vector ones, features all."""
        if model == self.settings.baseline_name:
            return [ADAPTER]
        if model == self.model_name:
            return list(self.settings.adapters)
        return [a for a in self.settings.adapters if not a.startswith(MIL_PREFIX)]

    def cases(self, role: str) -> SurvivalCases:
        index = self.splits.get(role, np.zeros(0, dtype=np.int64))
        ids = [self.data.patients[i] for i in index]
        metadata = {column: [values[i] for i in index] for column, values in self.data.groups.items()}
        return SurvivalCases(ids, ids, self.data.time[index], self.data.event[index], metadata)

    @cached_property
    def train(self) -> SurvivalCases:
        return self.cases("train")

    @cached_property
    def val(self) -> SurvivalCases:
        """Empty: the penalty is chosen by cross-validation inside train (kept so every task has train/val/test)."""
        return self.cases("val")

    @cached_property
    def test(self) -> SurvivalCases:
        return self.cases("test")

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(repr((self.data.feature_names, self.settings.model_dump(mode="json"))).encode())
        for role, index in self.splits.items():
            digest.update(f"{role}:{[self.data.patients[i] for i in index]}".encode())
        for array in (self.data.time, self.data.event, self.data.features, self.data.baseline, *(self.data.bags or [])):
            if array is not None:
                digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Changes whenever a patient's features, time, event or split changes."""
        return self._fingerprint

    def grouping(self) -> str:
        counts = "/".join(str(len(self.splits[r])) for r in ROLES)
        carved = "; test carved by patient, stratified on the event" if self.carved else ""
        return f"one row per patient ({counts} patients in train/test, none in both){carved}"

    def metadata(self) -> dict[str, Any]:
        events = {role: int(self.data.event[index].sum()) for role, index in self.splits.items()}
        return {
            "kind": self.kind,
            "splits": {role: len(index) for role, index in self.splits.items()},
            "events": events,
            "carved_from_train": self.carved,
            "grouping": self.grouping(),
            "precomputed_features": True,
            "features": self.data.feature_names,
            "baseline_features": list(self.settings.baseline_features),
            "baseline_encoding": self.settings.baseline_encoding,
            "adapters": list(self.settings.adapters),
            "combined_model": self.combined_name,
            "slide_bags": self.data.bags is not None,
            "dropped_incomplete": self.data.dropped,
            "horizons": dict(self.settings.horizons),
            "survival": {"risk_groups": self.risk_groups},
            **({"subgroups": self.subgroups} if self.subgroups else {}),
        }

    def describe(self) -> str:
        dropped = f", {self.data.dropped} patient(s) with missing values left out" if self.data.dropped else ""
        events = "/".join(str(int(self.data.event[self.splits[r]].sum())) for r in ROLES)
        baseline = f"; baseline {self.settings.baseline_name}" if self.settings.baseline_features else ""
        baseline += f", combined {self.combined_name}" if self.combined_name else ""
        bags = f" (patient bags of {sum(len(b) for b in self.data.bags)} tiles)" if self.data.bags else ""
        return (
            f"{self.name}: survival, {len(self.data.features[0])} features{bags}, adapters "
            f"{', '.join(self.settings.adapters)}, train/test "
            f"{'/'.join(str(len(self.splits[r])) for r in ROLES)} patients ({events} events){dropped}{baseline}; "
            f"headline metric {self.metrics[0]}"
        )


def _read_csv(path: Path) -> Any:
    import pandas as pd  # scikit-survival's own dependency

    if not path.is_file():
        raise DataError("survival table not found", path)
    try:
        return pd.read_csv(path)
    except (ValueError, OSError) as error:
        raise DataError(f"cannot read the survival table as CSV ({error})", path) from None


def _numeric(table: Any, column: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce")
    bad = table[column][values.isna() & table[column].notna()]
    if len(bad):
        raise DataError(f"column {column!r} must be numeric, found {str(bad.iloc[0])!r}", path)
    return values.to_numpy(dtype=np.float64)


def _embedding_features(path: Path, patients: list[str]) -> tuple[np.ndarray, list[str]]:
    """Per-patient mean of an embeddings file's rows, aligned with ``patients`` (NaN rows for patients without any)."""
    from medfoundry.models.features import read_embeddings

    embeddings, _ = read_embeddings(path)
    features = np.asarray(embeddings.features, dtype=np.float64)
    rows: dict[str, list[int]] = {}
    for i, patient in enumerate(embeddings.patient_ids):
        rows.setdefault(str(patient), []).append(i)
    out = np.full((len(patients), features.shape[1]), np.nan)
    for j, patient in enumerate(patients):
        if patient in rows:
            # Survival is a patient's outcome: several images of one patient are pooled into one row.
            out[j] = features[rows[patient]].mean(axis=0)
    return out, [f"{path.stem}[{k}]" for k in range(features.shape[1])]


def _patient_bags(
    folder: Path, slides: Path | None, patients: list[str]
) -> tuple[list[np.ndarray | None], np.ndarray, list[str]]:
    """Each patient's tiles from ``folder`` (None without any slide file), their per-patient mean (NaN rows for
    those without) and its column names; a DataError naming the file for a bad map or feature file."""
    from medfoundry.mil.data import is_plain_slide_id, read_bag_file

    if not folder.is_dir():
        raise DataError("slide bags folder not found", folder)
    if slides is not None:
        table = _read_csv(slides)
        missing = [c for c in ("slide_id", "patient_id") if c not in table.columns]
        if missing:
            raise DataError(f"column {missing[0]!r} is missing; the slides map needs slide_id,patient_id", slides)
        pairs = [(str(s), str(p)) for s, p in zip(table["slide_id"], table["patient_id"], strict=True)]
    else:
        pairs = [(p, p) for p in patients]
    bad = [slide for slide, _ in pairs if not is_plain_slide_id(slide)]
    if bad:
        # Slide ids become file names: a path in one would read outside the folder the user named.
        raise DataError(f"slide id {bad[0]!r} is not a plain file name", slides or folder)
    tiles: dict[str, list[np.ndarray]] = {}
    for slide, patient in pairs:
        path = folder / f"{slide}.h5"
        if path.is_file():
            features = read_bag_file(path)[0]
            if len(features):
                tiles.setdefault(patient, []).append(features)
    if not tiles:
        raise DataError(f"no patient of the survival table has a slide file ({len(pairs)} slides named)", folder)
    widths = {t.shape[1] for parts in tiles.values() for t in parts}
    if len(widths) > 1:
        raise DataError(f"slide feature widths differ ({sorted(widths)}); were they embedded by one encoder?", folder)
    (width,) = widths
    # A patient's slides form one bag: survival is the patient's outcome, and the heads attend over all their tiles.
    bags = [np.concatenate(tiles[p]).astype(np.float32) if p in tiles else None for p in patients]
    means = np.full((len(patients), width), np.nan)
    for j, bag in enumerate(bags):
        if bag is not None:
            means[j] = bag.mean(axis=0)
    return bags, means, [f"{folder.name}[{k}]" for k in range(width)]


def encode_baseline(baseline: np.ndarray, names: list[str], encoding: str) -> tuple[np.ndarray, list[str]]:
    """The baseline columns as they are (ordinal), or one 0/1 column per value but the lowest of each (onehot)."""
    if encoding == "ordinal":
        return baseline, list(names)
    columns, out_names = [], []
    for k, name in enumerate(names):
        values = baseline[:, k]
        # The lowest value is the reference level: a full set of indicators would be collinear with the baseline
        # hazard of a Cox model.
        for level in np.unique(values[np.isfinite(values)])[1:]:
            columns.append(np.where(np.isfinite(values), (values == level).astype(np.float64), np.nan))
            out_names.append(f"{name}={level:g}")
    if not columns:
        return np.zeros((len(baseline), 0)), []
    return np.column_stack(columns), out_names


def load_survival_table(source: Path, settings: SurvivalConfig, group_columns: Sequence[str] = ()) -> SurvivalData:
    """The complete cases of ``source``; a DataError naming the file and the column for each kind of bad input.
    ``group_columns`` (the task's subgroups) are read as text, an empty cell as the group "missing"."""
    table = _read_csv(source)
    s = settings
    named = [s.time_column, s.event_column, s.patient_column, *s.baseline_features, *(s.feature_columns or [])]
    named += list(group_columns)
    named += [s.split_column] if s.split_column else []
    missing = [c for c in dict.fromkeys(named) if c not in table.columns]
    if missing:
        raise DataError(f"column {missing[0]!r} is missing (columns: {', '.join(map(str, table.columns))})", source)
    patients = [str(p) for p in table[s.patient_column]]
    seen: dict[str, int] = {}
    for patient in patients:
        seen[patient] = seen.get(patient, 0) + 1
    repeated = [p for p, n in seen.items() if n > 1]
    if repeated:
        raise DataError(
            f"column {s.patient_column!r}: patient {repeated[0]!r} has {seen[repeated[0]]} rows; "
            "a survival table has one row per patient",
            source,
        )
    time = _numeric(table, s.time_column, source)
    negative = np.flatnonzero(time < 0)
    if len(negative):
        i = negative[0]
        raise DataError(
            f"column {s.time_column!r} has {len(negative)} negative time(s) (patient {patients[i]!r}: {time[i]:g})",
            source,
        )
    event = _numeric(table, s.event_column, source)
    bad = np.flatnonzero(~np.isnan(event) & ~np.isin(event, (0.0, 1.0)))
    if len(bad):
        i = bad[0]
        raise DataError(
            f"column {s.event_column!r} must be 0 (censored) or 1 (event), "
            f"found {event[i]:g} (patient {patients[i]!r})",
            source,
        )
    used = {s.time_column, s.event_column, s.patient_column, *s.baseline_features}
    used |= {s.split_column} if s.split_column else set()
    bags: list[np.ndarray | None] | None = None
    if s.embeddings is not None and s.bags is not None:
        raise DataError("give survival.embeddings or survival.bags as the features, not both", source)
    if s.embeddings is not None:
        features, names = _embedding_features(Path(s.embeddings), patients)
    elif s.bags is not None:
        bags, features, names = _patient_bags(Path(s.bags), Path(s.slides) if s.slides else None, patients)
    else:
        names = s.feature_columns or [str(c) for c in table.columns if c not in used and table[c].dtype.kind in "iuf"]
        if not names:
            raise DataError("no feature column: name them in survival.feature_columns", source)
        features = np.column_stack([_numeric(table, c, source) for c in names])
    baseline, baseline_names = None, []
    if s.baseline_features:
        raw = np.column_stack([_numeric(table, c, source) for c in s.baseline_features])
        baseline, baseline_names = encode_baseline(raw, list(s.baseline_features), s.baseline_encoding)
        # One-hot columns are NaN exactly where the raw value is: completeness is judged on the raw columns.
        baseline = np.where(np.isfinite(raw).all(axis=1, keepdims=True), baseline, np.nan)
    split = [None if v != v else str(v).strip().lower() for v in table[s.split_column]] if s.split_column else None
    columns = [time[:, None], event[:, None], features] + ([baseline] if baseline is not None else [])
    complete = np.isfinite(np.column_stack(columns)).all(axis=1)
    if not complete.any():
        raise DataError("no patient has every used column filled (time, event, features, baseline)", source)
    keep = np.flatnonzero(complete)
    return SurvivalData(
        patients=[patients[i] for i in keep],
        time=time[keep],
        event=event[keep].astype(bool),
        features=features[keep],
        feature_names=names,
        baseline=baseline[keep] if baseline is not None else None,
        split=[split[i] for i in keep] if split is not None else [None] * len(keep),
        dropped=int((~complete).sum()),
        baseline_names=baseline_names,
        bags=[bags[i] for i in keep] if bags is not None else None,  # type: ignore[misc]  # complete: not None
        groups={c: [_group_name(table[c].iloc[i]) for i in keep] for c in group_columns},
    )


def _group_name(value: Any) -> str:
    return "missing" if value is None or value != value or str(value).strip() == "" else str(value).strip()


def survival_splits(
    data: SurvivalData, config: TaskConfig, settings: SurvivalConfig
) -> tuple[dict[str, Any], list[str]]:
    """Train / test patient indices: from the split column, else the test split carved by patient on the event."""
    from medfoundry.data.splits import patient_split

    where = Path(str(config.source))
    unknown = sorted({r for r in data.split if r not in (None, "train", "val", "test")})
    if unknown:
        raise DataError(f"column {settings.split_column!r} has value {unknown[0]!r}; use train, val or test", where)
    roles = np.asarray(["test" if r == "test" else "train" for r in data.split])
    splits = {role: np.flatnonzero(roles == role) for role in ROLES}
    carved = []
    if len(splits["test"]) == 0:
        parts = patient_split(
            [data.patients[i] for i in splits["train"]], data.event[splits["train"]].astype(np.int64),
            (1.0 - config.test_fraction, config.test_fraction), config.split_seed, names=ROLES,
        )  # fmt: skip
        splits = {role: splits["train"][parts[role]] for role in ROLES}
        carved.append("test")
    for role in ROLES:
        if not data.event[splits[role]].any():
            raise DataError(
                f"column {settings.event_column!r}: no event (1) among the {len(splits[role])} patients of the "
                f"{role} split; a C-index needs events",
                where,
            )
    return splits, carved


def fit_coxnet(x: np.ndarray, time: np.ndarray, event: np.ndarray, settings: SurvivalConfig, seed: int) -> Any:
    """Coxnet on standardised features, its penalty chosen by event-stratified CV on Harrell's C."""
    from sklearn.exceptions import FitFailedWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    require("sksurv", "survival", "survival tasks")
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    y = Surv.from_arrays(event, time)
    with warnings.catch_warnings():
        # The strong-penalty end of the path zeroes every coefficient (coxnet warns, and a few CV fits fail
        # numerically there): those penalties simply score as chance (error_score) and lose the search.
        warnings.filterwarnings("ignore", message="all coefficients are zero")
        warnings.filterwarnings("ignore", category=FitFailedWarning)
        # Two decades below the penalty that zeroes every coefficient: the range sksurv itself uses when features
        # outnumber patients (embeddings), kept for every task so that cells are fitted alike.
        coxnet = CoxnetSurvivalAnalysis(l1_ratio=settings.l1_ratio, n_alphas=settings.n_alphas, alpha_min_ratio=0.01)
        alphas = make_pipeline(StandardScaler(), coxnet).fit(x, y)[-1].alphas_
        folds = min(settings.cv_folds, int(event.sum()), int((~event).sum()))
        model = make_pipeline(StandardScaler(), CoxnetSurvivalAnalysis(l1_ratio=settings.l1_ratio))
        if folds < 2:
            # Too few events to cross-validate: the weakest penalty of the path, the closest to a plain Cox fit.
            return model.set_params(coxnetsurvivalanalysis__alphas=[alphas[-1]]).fit(x, y)
        search = GridSearchCV(
            model,
            {"coxnetsurvivalanalysis__alphas": [[a] for a in alphas]},
            cv=list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, event)),
            error_score=0.5,
        )
        return search.fit(x, y).best_estimator_


def _targets(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    return np.column_stack([time, event.astype(np.float64)])


def fit_deep_cox(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    patients: list[str],
    x_test: np.ndarray,
    settings: SurvivalConfig,
    seed: int,
) -> tuple[np.ndarray, int]:
    """Test risks (log hazards) of an MLP on standardised features trained on the Cox partial likelihood,
    early-stopped on a patient-grouped, event-stratified part of the training rows; and its parameter count."""
    from sklearn.preprocessing import StandardScaler

    from medfoundry.mil.models import count_trainable
    from medfoundry.mil.train import predict_mil, train_mil

    scaler = StandardScaler().fit(x)

    def rows(a: np.ndarray) -> list[np.ndarray]:
        return [row[None, :] for row in scaler.transform(a).astype(np.float32)]

    # Mean pooling over a one-instance bag is exactly an MLP (linear, ReLU, dropout, linear): the MIL trainer's
    # seeding, early stopping and Cox objective then serve the deep Cox head and the MIL heads alike.
    fit = train_mil(
        "mean", rows(x), _targets(time, event), patient_ids=patients, config=settings.deep_cox, seed=seed,
        objective="cox",
    )  # fmt: skip
    return predict_mil(fit.model, rows(x_test), objective="cox").proba[:, 0], count_trainable(fit.model)


def fit_mil_cox(
    model: str,
    bags: list[np.ndarray],
    time: np.ndarray,
    event: np.ndarray,
    patients: list[str],
    test_bags: list[np.ndarray],
    settings: SurvivalConfig,
    seed: int,
) -> tuple[np.ndarray, int]:
    """Test risks of a registered MIL head trained on patient bags with the Cox loss; and its parameter count."""
    from medfoundry.mil.models import count_trainable
    from medfoundry.mil.train import predict_mil, train_mil

    fit = train_mil(
        model, bags, _targets(time, event), patient_ids=patients, config=settings.mil_train, seed=seed,
        objective="cox",
    )  # fmt: skip
    return predict_mil(fit.model, test_bags, objective="cox").proba[:, 0], count_trainable(fit.model)


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    require("sksurv", "survival", "survival tasks")
    from sksurv.util import Surv

    return Surv.from_arrays(event.astype(bool), time)


class _Metrics:
    """Harrell's C, Uno's C and time-dependent AUC of risks on (a resample of) the test patients."""

    def __init__(self, task: SurvivalTask) -> None:
        train = task.splits["train"]
        self.names = list(task.metrics)
        self.train = _surv(task.data.time[train], task.data.event[train])
        self.horizons = dict(task.settings.horizons)
        self.tau = task.settings.tau or (max(self.horizons.values()) if self.horizons else None)

    def __call__(self, time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float]:
        require("sksurv", "survival", "survival tasks")
        from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc

        values: dict[str, float] = {}
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            if HEADLINE in self.names:
                values[HEADLINE] = _or_nan(lambda: concordance_index_censored(event, time, risk)[0])
            test = _surv(time, event)
            if "uno_c" in self.names:
                values["uno_c"] = _or_nan(lambda: concordance_index_ipcw(self.train, test, risk, tau=self.tau)[0])
            wanted = [(n, t) for n, t in self.horizons.items() if f"auc_{n}" in self.names]
            if wanted:
                try:
                    auc = cumulative_dynamic_auc(self.train, test, risk, [t for _, t in wanted])[0]
                except ValueError:  # a horizon outside this resample's follow-up
                    auc = np.full(len(wanted), np.nan)
                values.update({f"auc_{n}": float(a) for (n, _), a in zip(wanted, auc, strict=True)})
        return values


def _or_nan(compute: Any) -> float:
    try:
        return float(compute())
    except (ValueError, ZeroDivisionError):  # no comparable pair in this resample
        return float("nan")


def _patient_index(patients: list[str]) -> tuple[np.ndarray, int]:
    index: dict[str, int] = {}
    rows = np.fromiter((index.setdefault(p, len(index)) for p in patients), dtype=np.int64, count=len(patients))
    return rows, len(index)


@dataclass
class SurvivalScorer(KindScorer[SurvivalTask]):
    """Survival metrics with patient-bootstrap CIs on the test split; per-patient risks as CSV."""

    @property
    def n_test(self) -> int:
        return len(self.task.test)

    def score(self, output: CellOutput, seed: int) -> Mapping[str, MetricValue]:
        test, risk = self.task.test, np.asarray(output.proba, dtype=np.float64)[:, 0]
        measure = _Metrics(self.task)
        point = measure(test.time, test.event, risk)
        n_bootstrap, confidence = self.evaluate.n_bootstrap, self.evaluate.confidence
        if n_bootstrap == 0:
            return {name: MetricValue(point[name], float("nan"), float("nan")) for name in self.metrics}
        draws: dict[str, list[float]] = {name: [] for name in self.metrics}
        rows, n_patients = _patient_index(test.patient_ids)
        everyone = np.arange(len(test))
        # The same patient resampling as every classification metric (resample_weights), applied by repeating rows:
        # the survival statistics take case lists, not weights.
        for weights in resample_weights(rows, n_patients, n_bootstrap, seed):
            for row in weights.astype(np.int64):
                idx = np.repeat(everyone, row)
                for name, value in measure(test.time[idx], test.event[idx], risk[idx]).items():
                    draws[name].append(value)
        return {
            name: percentile_interval(point[name], np.asarray(draws[name]), n_bootstrap, confidence)
            for name in self.metrics
        }

    def save_predictions(self, path: Path, output: CellOutput) -> None:
        test = self.task.test
        lines = ["id,patient_id,time,event,risk"]
        lines += [
            f"{i},{p},{t:g},{int(e)},{float(r)!r}"
            for i, p, t, e, r in zip(test.ids, test.patient_ids, test.time, test.event, output.proba[:, 0], strict=True)
        ]
        write_text_atomic(path, "\n".join(lines) + "\n")


def read_risks(path: Path) -> np.ndarray:
    """The risk column of a predictions CSV written by :meth:`SurvivalScorer.save_predictions`."""
    import pandas as pd

    return pd.read_csv(io.StringIO(path.read_text()))["risk"].to_numpy(dtype=np.float64)


def kaplan_meier_groups(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, Any]:
    """Kaplan-Meier curves of the patients above and at-or-below the median risk, and the log-rank test."""
    require("sksurv", "survival", "survival tasks")
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator

    high = risk > np.median(risk)
    groups: dict[str, Any] = {"split": "median predicted risk on the test split"}
    for label, members in (("high", high), ("low", ~high)):
        t, s = kaplan_meier_estimator(event[members], time[members])
        groups[label] = {"n": int(members.sum()), "events": int(event[members].sum()),
                         "time": [0.0, *map(float, t)], "survival": [1.0, *map(float, s)]}  # fmt: skip
    if high.all() or not high.any():
        groups.update(chi2=float("nan"), p_value=float("nan"))
    else:
        chi2, p_value = compare_survival(_surv(time, event), np.where(high, "high", "low"))
        groups.update(chi2=float(chi2), p_value=float(p_value))
    return groups


class SurvivalKind(TaskKind[SurvivalTask]):
    name = KIND
    default_metrics = (HEADLINE, "uno_c")

    def load(self, config: TaskConfig) -> SurvivalTask:
        assert config.source is not None and config.survival is not None  # TaskSource checks a survival task
        settings = SurvivalConfig.model_validate(config.survival)
        mil = [a for a in settings.adapters if a.startswith(MIL_PREFIX)]
        if mil and settings.bags is None:
            raise MedfoundryError(f"task '{config.name}': adapter {mil[0]} needs slide bags (survival.bags)")
        if config.subgroup_file:
            raise MedfoundryError(
                f"task '{config.name}': a survival task's subgroup columns come from its own table; "
                "drop subgroup_file and add the columns to the survival CSV"
            )
        data = load_survival_table(Path(config.source), settings, config.subgroups)
        known = _metric_names(settings)
        metrics = list(config.metrics or known)
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise MedfoundryError(f"task '{config.name}': unknown survival metric(s) {unknown}; known: {known}")
        splits, carved = survival_splits(data, config, settings)
        task = SurvivalTask(config, settings, data, splits, metrics, carved)
        if config.subgroups:
            task.subgroup_notes = check_subgroups(
                task.test.metadata,
                config.subgroups,
                config.min_group_size,
                config.source,
                task.test.event,
                config.min_group_events,
            )
        return task

    def scorer(self, task: SurvivalTask, evaluate: EvaluateConfig) -> SurvivalScorer:
        return SurvivalScorer(task, evaluate)

    def _cells(self, ctx: EngineContext, task: SurvivalTask, model: str, x: np.ndarray) -> Iterator[Cell]:
        config, data, settings = ctx.config, task.data, task.settings
        train, test = task.splits["train"], task.splits["test"]
        budgets = LabelBudgets(list(config.adapt.label_fractions), list(config.adapt.seeds), config.adapt.min_per_class)

        def fit(adapter: str, subset: np.ndarray, seed: int) -> CellOutput:
            chosen = train[subset]
            time, event, patients = data.time[chosen], data.event[chosen], [data.patients[i] for i in chosen]
            if adapter == ADAPTER:
                cox = fit_coxnet(x[chosen], time, event, settings, seed)
                risk, n_params = cox.predict(x[test]), int(x.shape[1])
            elif adapter == DEEP_COX:
                risk, n_params = fit_deep_cox(x[chosen], time, event, patients, x[test], settings, seed)
            else:
                assert data.bags is not None  # load() refuses MIL adapters without bags
                bags = data.bags
                risk, n_params = fit_mil_cox(
                    adapter.removeprefix(MIL_PREFIX), [bags[i] for i in chosen], time, event, patients,
                    [bags[i] for i in test], settings, seed,
                )  # fmt: skip
            return CellOutput(np.asarray(risk, dtype=np.float64)[:, None], len(subset), n_params)

        inputs = ["precomputed", model, settings.model_dump(mode="json")]
        # Subsets stratified on the event: every subset keeps the table's share of events.
        yield from grid_cells(model, task.adapters(model), budgets, data.event[train].astype(np.int64), inputs, fit)

    def encoder_cells(
        self, ctx: EngineContext, task: SurvivalTask, spec: EncoderConfig, encoder: Any
    ) -> Iterator[Cell]:
        yield from self._cells(ctx, task, task.model_name, task.data.features)
        if task.combined_name is not None and task.data.baseline is not None:
            combined = np.hstack([task.data.features, task.data.baseline])
            yield from self._cells(ctx, task, task.combined_name, combined)

    def baseline_cells(self, ctx: EngineContext, task: SurvivalTask) -> Iterator[Cell]:
        if task.data.baseline is not None:
            yield from self._cells(ctx, task, task.settings.baseline_name, task.data.baseline)

    def comparisons(self, ctx: EngineContext, task: SurvivalTask, records: list[Any]) -> list[dict[str, Any]]:
        config = ctx.config
        store = CellStore(config.output_dir / "tasks" / task.name)
        seeds = list(config.adapt.seeds)
        fractions = sorted({r.label_fraction for r in records})
        fits = list(dict.fromkeys((r.model, r.adapter) for r in records))

        def runs(model: str, adapter: str, fraction: float) -> list[np.ndarray]:
            paths = [store.predictions_path(CellKey(model, adapter, fraction, s)) for s in seeds]
            return [read_risks(p) for p in paths if p.is_file()]

        test = task.test
        for model, adapter in fits:
            risks = runs(model, adapter, max(fractions))
            if risks:
                label = model if adapter == ADAPTER else f"{model} ({adapter})"
                task.risk_groups[label] = kaplan_meier_groups(test.time, test.event, risks[0])
        if task.config.subgroups:
            self._subgroups(ctx, task, fits, max(fractions), runs)
        reference = (task.settings.baseline_name, ADAPTER)
        if reference not in fits:
            return []
        out = []
        for model, adapter in fits:
            if (model, adapter) == reference:
                continue
            for fraction in fractions:
                runs_a, runs_b = runs(model, adapter, fraction), runs(*reference, fraction)
                if runs_a and runs_b:
                    out.append(self._paired(config, task, fraction, (model, adapter), runs_a, runs_b))
        return out

    def _subgroups(
        self, ctx: EngineContext, task: SurvivalTask, fits: list[tuple[str, str]], fraction: float, runs: Any
    ) -> None:
        """Harrell's C per group of each subgroup column, for every model and adapter at all training labels
        (``fraction``) and its first seed: the same joint patient bootstrap and gap as classification subgroups.
        One seed, one metric: each group's C-index is resampled 1,000 times per model, which would take minutes for
        every seed and metric."""
        require("sksurv", "survival", "survival tasks")
        from sksurv.metrics import concordance_index_censored

        started = perf_counter()
        for note in task.subgroup_notes:
            ctx.echo(f"  [{task.name}] {note}")
        test, evaluate, spec = task.test, ctx.config.evaluate, task.config
        settings = SubgroupSettings(tuple(spec.subgroups), spec.min_group_size, evaluate.n_bootstrap,
                                    evaluate.confidence, ctx.config.adapt.seeds[0], spec.min_group_events)  # fmt: skip
        everyone = np.arange(len(test))
        cells = []
        for model, adapter in fits:
            risks = runs(model, adapter, fraction)
            if not risks:
                continue
            risk = risks[0]

            def point_of(mask: np.ndarray, risk: np.ndarray = risk) -> float:
                return _or_nan(lambda: concordance_index_censored(test.event[mask], test.time[mask], risk[mask])[0])

            def draws_of(weights: np.ndarray, mask: np.ndarray, risk: np.ndarray = risk) -> np.ndarray:
                idx = [np.repeat(everyone, row) for row in (weights * mask).astype(np.int64)]
                return np.asarray([point_of(i, risk) for i in idx])

            cell = {"model": model, "adapter": adapter, "label_fraction": fraction, "seed": settings.seed}
            for column in spec.subgroups:
                entry = subgroup_entry(column, HEADLINE, test.metadata[column], test.patient_ids, point_of,
                                       draws_of, settings, test.event)  # fmt: skip
                cells.append({**cell, **entry})
        task.subgroups = {
            "columns": list(spec.subgroups),
            "min_group_size": spec.min_group_size,
            "min_group_events": spec.min_group_events,
            "groups": {c: sorted(set(test.metadata[c])) for c in spec.subgroups},
            "cells": cells,
        }
        ctx.durations[f"{task.name}/subgroups"] = perf_counter() - started

    def _paired(
        self,
        config: SuiteConfig,
        task: SurvivalTask,
        fraction: float,
        fit_a: tuple[str, str],
        runs_a: list[np.ndarray],
        runs_b: list[np.ndarray],
    ) -> dict[str, Any]:
        """Harrell's C of one model minus the baseline's, seed-averaged, on the same patient resamples."""
        require("sksurv", "survival", "survival tasks")
        from sksurv.metrics import concordance_index_censored

        test = task.test

        def c_index(idx: np.ndarray, runs: list[np.ndarray]) -> float:
            return float(np.mean([_or_nan(lambda r=r: concordance_index_censored(
                test.event[idx], test.time[idx], r[idx])[0]) for r in runs]))  # fmt: skip

        everyone = np.arange(len(test))
        value_a, value_b = c_index(everyone, runs_a), c_index(everyone, runs_b)
        rows, n_patients = _patient_index(test.patient_ids)
        n_bootstrap = config.comparisons.n_bootstrap
        diffs = [
            c_index(idx, runs_a) - c_index(idx, runs_b)
            for weights in resample_weights(rows, n_patients, n_bootstrap, 0)
            for idx in (np.repeat(everyone, row) for row in weights.astype(np.int64))
        ]
        point = value_a - value_b
        interval = percentile_interval(point, np.asarray(diffs), n_bootstrap, config.evaluate.confidence)
        share = share_opposite(point, np.asarray(diffs)[np.isfinite(diffs)])
        return {
            "task": task.name, "metric": HEADLINE, "label_fraction": fraction,
            "model_a": fit_a[0], "adapter_a": fit_a[1], "model_b": task.settings.baseline_name,
            "adapter_b": ADAPTER, "value_a": value_a, "value_b": value_b, "difference": point,
            "ci_low": interval.ci_low, "ci_high": interval.ci_high, "share_opposite": share,
            "n_seeds": max(len(runs_a), len(runs_b)), "confidence": config.evaluate.confidence,
        }  # fmt: skip


TASK_KINDS.add(KIND, SurvivalKind())
