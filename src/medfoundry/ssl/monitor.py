"""Pre-training health: collapse checks with thresholds that mean trouble, and an online kNN monitor.

Each reading (every ``monitor_every_steps``) records the loss, the spread and effective rank of the student's
features, for DINO and iBOT the teacher's relative entropy and prototype use, and, given a small labelled set, the
kNN accuracy of the features on its held-out part. The checks (docs/pretraining-health.md):

================================  ==========  ====================================================================
check                             trouble if  why
================================  ==========  ====================================================================
feature spread (``feature_std``)  < 0.05      near-identical feature vectors; healthy ViT CLS features read ~0.08+
effective rank (RankMe)           < 2         the features span a line or a plane
teacher relative entropy          > 0.9       the teacher's prototype distribution is near uniform (entropy over
                                              log K): the targets say nothing about the image
prototype use                     < 10%       a handful of prototypes take every image; counted as distinct argmax
                                              prototypes over the most the batch could use, min(K, rows)
================================  ==========  ====================================================================

The teacher checks start once the teacher-temperature warm-up is over (``judge_teacher_from_step``): a fresh
head is near uniform by construction. A check that fails ``patience`` readings in a row raises a warning (once per
episode, logged and kept in ``warnings``), and a check that fails at the last reading of the run raises one too, so
a short run still gets a verdict. A check that hovers at its threshold never keeps a streak, so a check that fails
in most of the recent readings (more than half of the last quarter of the run, and at least ``patience`` of them)
warns and counts as collapse too: a DINO run whose prototype use read below 10% at 45 of its 48 readings, but 10.2%
at the last, is not a healthy run. The reviewed DINO run that ended at relative entropy 0.968 with 3.4% of its 1024
prototypes in use, and the BreastMNIST centring collapse of shared/reference/cpu-ssl-trial.md (6.57 of 6.93 nats,
about 10 prototypes in use), both fail the entropy check.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medfoundry.errors import DataError

if TYPE_CHECKING:
    from medfoundry.data.sample import ImageSet
    from medfoundry.models.backbones import Encoder

log = logging.getLogger("medfoundry.pretrain")

# Thresholds that mean trouble (module docstring).
MIN_FEATURE_STD = 0.05
MIN_EFFECTIVE_RANK = 2.0
MAX_TEACHER_ENTROPY = 0.9
MIN_PROTOTYPE_USE = 0.10
# The same, keyed by the reading's field, for reports: trouble below "min" or above "max".
HEALTH_THRESHOLDS: dict[str, dict[str, Any]] = {
    "feature_std": {"min": MIN_FEATURE_STD, "meaning": "near-identical feature vectors"},
    "effective_rank": {"min": MIN_EFFECTIVE_RANK, "meaning": "the features span a line or a plane"},
    "teacher_entropy": {"max": MAX_TEACHER_ENTROPY, "meaning": "the teacher's prototype distribution is near uniform"},
    "prototype_use": {"min": MIN_PROTOTYPE_USE, "meaning": "a handful of prototypes take every image"},
}


@torch.no_grad()
def feature_std(features: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised features, scaled by sqrt(dim) so ~1 means well spread."""
    normalized = F.normalize(features.float(), dim=1)
    return float(normalized.std(dim=0).mean() * math.sqrt(features.shape[1]))


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values."""
    singular = torch.linalg.svdvals(features.float() - features.float().mean(dim=0))
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def prediction_entropy(logits: torch.Tensor, temperature: float) -> tuple[float, float]:
    """Mean entropy of softmax(logits / T) relative to its maximum log(K), and the share of used prototypes."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
    used = probs.argmax(dim=-1).unique().numel()
    return float(entropy / math.log(logits.shape[-1])), used / logits.shape[-1]


@torch.no_grad()
def prototype_use(logits: torch.Tensor) -> float:
    """Distinct argmax prototypes over the most these rows could use, min(K, rows).

    The share of all K prototypes cannot exceed rows / K (12.5% for 128 rows and 1024 prototypes), so it would
    read as trouble in every small-batch run; this share is 1 when every row picks its own prototype.
    """
    used = logits.argmax(dim=-1).unique().numel()
    return used / max(1, min(logits.shape[-1], logits.shape[0]))


def teacher_readings(teacher_logits: torch.Tensor, teacher_temp: float) -> dict[str, float]:
    """The monitor values a DINO-style teacher gives: relative entropy, prototypes used (of K) and prototype use."""
    entropy, used = prediction_entropy(teacher_logits, teacher_temp)
    return {"teacher_entropy": entropy, "prototypes_used": used, "prototype_use": prototype_use(teacher_logits)}


@dataclass
class CollapseMonitor:
    """Reads the health of a run every few steps and warns when a check keeps failing (module docstring)."""

    # Backbone features (a ViT's CLS token above all) share a large common direction even when healthy: a
    # SimCLR run whose probes beat random features by 0.05-0.1 AUROC read 0.08 here. Near-identical vectors
    # read below 0.05, so only that is flagged.
    min_feature_std: float = MIN_FEATURE_STD
    min_effective_rank: float = MIN_EFFECTIVE_RANK
    max_teacher_entropy: float = MAX_TEACHER_ENTROPY
    min_prototype_use: float = MIN_PROTOTYPE_USE
    patience: int = 3
    judge_teacher_from_step: int = 0
    bad_readings: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    # Consecutive failing readings per check, and the checks already warned about in their current episode; the
    # failing checks of each reading, and the checks warned about as failing in most recent readings.
    _streaks: dict[str, int] = field(default_factory=dict, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)
    _failed: list[set[str]] = field(default_factory=list, repr=False)
    _warned_recent: set[str] = field(default_factory=set, repr=False)

    def problems(self, reading: dict[str, Any]) -> dict[str, str]:
        """The failing checks of one reading, each with a one-line reason."""
        found: dict[str, str] = {}
        if self.min_feature_std > 0 and reading["feature_std"] < self.min_feature_std:
            found["feature_std"] = f"feature spread {reading['feature_std']:.3f} < {self.min_feature_std}"
        if reading["effective_rank"] < self.min_effective_rank:
            found["effective_rank"] = f"effective rank {reading['effective_rank']:.1f} < {self.min_effective_rank}"
        if reading["step"] >= self.judge_teacher_from_step:
            entropy = reading.get("teacher_entropy")
            if entropy is not None and entropy > self.max_teacher_entropy:
                found["teacher_entropy"] = (
                    f"teacher relative entropy {entropy:.3f} > {self.max_teacher_entropy} (near uniform)"
                )
            use = reading.get("prototype_use")
            if use is not None and use < self.min_prototype_use:
                found["prototype_use"] = f"prototype use {use:.1%} < {self.min_prototype_use:.0%}"
        return found

    def update(
        self,
        step: int,
        features: torch.Tensor,
        extra: dict[str, float] | None = None,
        loss: float | None = None,
    ) -> dict[str, Any]:
        reading: dict[str, Any] = {
            "step": float(step),
            **({"loss": float(loss)} if loss is not None else {}),
            "feature_std": feature_std(features),
            "effective_rank": effective_rank(features),
            **(extra or {}),
        }
        return self.record(reading)

    def record(self, reading: dict[str, Any]) -> dict[str, Any]:
        """Judge a reading (as :meth:`update` builds it), keep it in ``history`` and return it."""
        problems = self.problems(reading)
        for check in list(self._streaks):
            if check not in problems:
                del self._streaks[check]
                self._warned.discard(check)
        new_warnings = []
        for check, reason in problems.items():
            self._streaks[check] = self._streaks.get(check, 0) + 1
            if self._streaks[check] >= self.patience and check not in self._warned:
                new_warnings.append(self._warn(reading, check, reason, f"for {self._streaks[check]} readings in a row"))
        self._failed.append(set(problems))
        recent = self.recent_failures()
        # An episode of "failing in most recent readings" ends only once the check passes a whole window: a check
        # flapping at the line would otherwise warn every few readings.
        self._warned_recent &= set().union(*self._failed[-self.recent_window() :])
        for check, (failed, window) in recent.items():
            if check not in self._warned_recent and check not in self._warned:
                reason = problems.get(check) or self._last_reason(check)
                new_warnings.append(self._warn(reading, check, reason, f"in {failed} of the last {window} readings"))
            self._warned_recent.add(check)
        self.bad_readings = max(self._streaks.values(), default=0)
        reading["warnings"] = new_warnings
        self.history.append(reading)
        return reading

    def finish(self) -> list[str]:
        """At the end of the run: warn about checks the last reading fails that have not warned yet."""
        if not self.history:
            return []
        last = self.history[-1]
        messages = []
        # A finished run called again (a resume with nothing left to do) must not repeat its verdict.
        said = {(w["step"], w["check"]) for w in self.warnings}
        for check, reason in self.problems(last).items():
            if check not in self._warned and (int(last["step"]), check) not in said:
                messages.append(self._warn(last, check, reason, "at the end of the run"))
        last["warnings"] = [*last.get("warnings", []), *messages]
        return messages

    def _warn(self, reading: dict[str, Any], check: str, reason: str, when: str) -> str:
        self._warned.add(check)
        message = f"pre-training health: {reason} at step {int(reading['step'])}, {when}"
        self.warnings.append({"step": int(reading["step"]), "check": check, "message": message})
        log.warning(message)
        return message

    def restore(self, history: list[dict[str, Any]], warnings: list[dict[str, Any]]) -> None:
        """Continue a resumed run's monitor: its readings, warnings and the streaks they leave."""
        self.warnings = list(warnings)
        for reading in history:
            saved = list(reading.get("warnings", []))
            before = len(self.warnings)
            self.record(dict(reading))
            # Replaying must not warn twice: the saved warnings already hold those.
            del self.warnings[before:]
            self.history[-1]["warnings"] = saved

    def recent_window(self) -> int:
        """How many of the latest readings "recent" means: a quarter of the run so far, at least ``patience``."""
        return max(self.patience, math.ceil(len(self._failed) / 4))

    def recent_failures(self) -> dict[str, tuple[int, int]]:
        """Checks failing in more than half of the recent readings, and at least ``patience`` of them: (failed, window).

        Only once the run has a full window of readings, so two bad readings of a short run are not a verdict.
        """
        window = self.recent_window()
        if len(self._failed) < window:
            return {}
        latest = self._failed[-window:]
        counts: dict[str, int] = {}
        for failed in latest:
            for check in failed:
                counts[check] = counts.get(check, 0) + 1
        return {
            check: (count, window) for check, count in counts.items() if count >= self.patience and count * 2 > window
        }

    def _last_reason(self, check: str) -> str:
        for reading in reversed(self.history):
            reason = self.problems(reading).get(check)
            if reason is not None:
                return reason
        return check

    @property
    def collapsed(self) -> bool:
        """A check has failed ``patience`` readings in a row, or in most of the recent readings."""
        return self.bad_readings >= self.patience or bool(self.recent_failures())

    def verdict(self) -> list[str]:
        """One line per check behind ``collapsed``: what failed, and how often."""
        lines = []
        recent = self.recent_failures()
        for check in sorted(set(recent) | {c for c, n in self._streaks.items() if n >= self.patience}):
            reason = self._last_reason(check)
            if self._streaks.get(check, 0) >= self.patience:
                lines.append(f"{reason} for {self._streaks[check]} readings in a row")
            else:
                failed, window = recent[check]
                lines.append(f"{reason} at its latest failure, and failing in {failed} of the last {window} readings")
        return lines

    def message(self) -> str:
        last = self.history[-1]
        return f"representation collapse suspected at step {int(last['step'])}: {' and '.join(self.verdict())}"


@dataclass
class KNNMonitorSet:
    """A small labelled set for the online kNN monitor: ``reference`` images vote for ``held_out`` ones.

    Labels are single class indices (``ImageSet.labels`` of shape (N,) or (N, 1)). Keep both parts small (a few
    hundred images): every reading embeds them with the encoder being trained.
    """

    reference: ImageSet
    held_out: ImageSet
    k: int | None = None
    temperature: float = 0.07
    batch_size: int = 256

    def __post_init__(self) -> None:
        for part in ("reference", "held_out"):
            images = getattr(self, part)
            if images.labels is None or len(images) == 0:
                raise DataError(f"the kNN monitor's {part} set needs labelled images", images.source)
            labels = np.asarray(images.labels)
            if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
                raise DataError(
                    f"the kNN monitor takes one class per image; {part} has labels of shape {labels.shape}",
                    images.source,
                )

    @classmethod
    def split(cls, images: ImageSet, held_out_fraction: float = 0.3, seed: int = 0) -> KNNMonitorSet:
        """Split one labelled set by patient into reference and held-out parts (no patient in both)."""
        patients = sorted(set(images.patient_ids))
        if len(patients) < 2:
            raise DataError("the kNN monitor needs images of at least two patients to hold some out", images.source)
        order = np.random.default_rng(seed).permutation(len(patients))
        n_held = min(len(patients) - 1, max(1, round(held_out_fraction * len(patients))))
        held = {patients[i] for i in order[:n_held]}
        in_held = np.array([p in held for p in images.patient_ids])
        return cls(
            reference=images.subset(np.flatnonzero(~in_held), name=f"{images.name}-knn-reference"),
            held_out=images.subset(np.flatnonzero(in_held), name=f"{images.name}-knn-held-out"),
        )

    def neighbours(self) -> int:
        """k: 20 as in DINO's evaluation, fewer for a small reference set (about its square root, at least 1)."""
        if self.k is not None:
            return max(1, min(self.k, len(self.reference)))
        return max(1, min(20, round(math.sqrt(len(self.reference)))))

    def evaluate(self, encoder: Encoder, device: torch.device | None = None) -> dict[str, float]:
        """kNN accuracy and balanced accuracy of ``encoder``'s features on the held-out part."""
        # Here: features.py imports the data and model stack, which the monitor's collapse checks do not need.
        from medfoundry.models.features import extract_features

        was_training = encoder.training
        reference = torch.from_numpy(extract_features(encoder, self.reference, self.batch_size, device=device))
        held_out = torch.from_numpy(extract_features(encoder, self.held_out, self.batch_size, device=device))
        encoder.train(was_training)
        ref_labels = torch.as_tensor(np.asarray(self.reference.labels).reshape(-1), dtype=torch.long)
        true = np.asarray(self.held_out.labels).reshape(-1).astype(np.int64)
        predicted = knn_predict(reference, ref_labels, held_out, self.neighbours(), self.temperature).numpy()
        recalls = [float((predicted[true == c] == c).mean()) for c in np.unique(true)]
        return {"knn_accuracy": float((predicted == true).mean()), "knn_balanced_accuracy": float(np.mean(recalls))}


@torch.no_grad()
def knn_predict(
    reference: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Cosine kNN with exp(similarity / T) votes, as DINO's and solo-learn's online kNN."""
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(reference.float(), dim=1).T
    top, index = similarity.topk(min(k, reference.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], int(labels.max()) + 1)
    votes.scatter_add_(1, labels[index], (top / temperature).exp())
    return votes.argmax(dim=1)
