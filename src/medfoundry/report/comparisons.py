"""Paired comparisons from metadata["comparisons"] and the plain-language sentence for each."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from medfoundry.evaluate.metrics import LOWER_IS_BETTER
from medfoundry.report.summary import adapter_key, format_fraction, format_number, metric_label


def _number(raw: Mapping[str, Any], key: str, default: float = math.nan) -> float:
    """``raw[key]`` as a float; ``default`` when it is missing or not a number (JSON null for a NaN CI, a bool)."""
    value = raw.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


@dataclass(frozen=True)
class Comparison:
    """One paired bootstrap difference A − B from metadata["comparisons"], averaged over seeds."""

    task: str
    metric: str
    label_fraction: float
    model_a: str
    adapter_a: str
    model_b: str
    adapter_b: str
    value_a: float
    value_b: float
    difference: float
    ci_low: float
    ci_high: float
    share_opposite: float
    n_seeds: int
    confidence: float

    @classmethod
    def from_mapping(cls, raw: Any) -> Comparison | None:
        """Parse one entry; None when it is malformed (metadata is not validated, so skip rather than fail)."""
        if not isinstance(raw, Mapping):
            return None

        def number(key: str, default: float = math.nan) -> float:
            return _number(raw, key, default)

        names = ("task", "metric", "model_a", "adapter_a", "model_b", "adapter_b")
        if not all(isinstance(raw.get(k), str) and raw.get(k) for k in names):
            return None
        difference = number("difference")
        fraction = number("label_fraction")
        if math.isnan(difference) or math.isnan(fraction):
            return None
        return cls(
            **{k: raw[k] for k in names},
            label_fraction=fraction,
            value_a=number("value_a"),
            value_b=number("value_b"),
            difference=difference,
            ci_low=number("ci_low"),
            ci_high=number("ci_high"),
            share_opposite=number("share_opposite"),
            n_seeds=int(number("n_seeds", 0)),
            confidence=number("confidence", 0.95),
        )

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    @property
    def significant(self) -> bool | None:
        """Whether the CI excludes 0; None without a CI."""
        return bool(self.ci_low > 0 or self.ci_high < 0) if self.has_ci else None

    @property
    def favours_a(self) -> bool:
        """Whether the difference points A's way (for ECE and other lower-is-better metrics, a negative one)."""
        return self.difference < 0 if self.metric in LOWER_IS_BETTER else self.difference > 0

    @property
    def verdict(self) -> str:
        """'significant', 'not significant', or 'not judged' when there is no CI."""
        return {True: "significant", False: "not significant", None: "not judged"}[self.significant]


def comparisons_from_metadata(metadata: Mapping[str, Any]) -> list[Comparison]:
    """The well-formed entries of metadata["comparisons"], in file order."""
    raw = metadata.get("comparisons")
    if not isinstance(raw, list):
        return []
    return [c for c in (Comparison.from_mapping(item) for item in raw) if c is not None]


def signed_number(value: float, digits: int = 3) -> str:
    """``format_number`` with a real minus sign: a hyphen reads as a dash in running text ("CI -0.02 to 0.05")."""
    return format_number(value, digits).replace("-", "−")


def confidence_level(confidence: float) -> str:
    """0.95 -> '95%'."""
    return f"{confidence * 100:.4g}%"


def describe_comparison(c: Comparison) -> tuple[str, str, str]:
    """A plain-language sentence about ``c``, split as (lead, verdict, detail) so HTML can style the verdict.

    The sentence is ``f"{lead}: {verdict}{detail}."``. It names the better side first, so the gap and its CI are
    read as "how much better"; for lower-is-better metrics (ECE) a negative A − B means A is better.
    """
    a, b = f"{c.model_a} + {c.adapter_a}", f"{c.model_b} + {c.adapter_b}"
    lower = c.metric in LOWER_IS_BETTER
    # Gain of A over B in the metric's good direction, with its CI flipped alongside.
    gain, lo, hi = (-c.difference, -c.ci_high, -c.ci_low) if lower else (c.difference, c.ci_low, c.ci_high)
    if gain < 0:
        a, b, gain, lo, hi = b, a, -gain, -hi, -lo
    metric = metric_label(c.metric) + (" (lower is better)" if lower else "")
    where = f"At {format_fraction(c.label_fraction)} labels"
    ci = f"{confidence_level(c.confidence)} CI {signed_number(lo)} to {signed_number(hi)}"
    significant = c.significant
    if significant:
        return f"{where}, {a} beats {b} on {metric} by {signed_number(gain)} ({ci})", "significant", ""
    if gain == 0:
        lead = f"{where}, {a} and {b} tie on {metric} (difference {signed_number(0.0)})"
    else:
        lead = f"{where}, {a} is ahead of {b} on {metric} by {signed_number(gain)}"
    if significant is None:
        return lead, "not judged", " (no confidence interval)"
    return lead, "not significant", f" ({ci} includes 0)"


def comparison_sentence(c: Comparison) -> str:
    """``describe_comparison`` as one plain-text sentence."""
    lead, verdict, detail = describe_comparison(c)
    return f"{lead}: {verdict}{detail}."


def comparison_order(c: Comparison) -> tuple[Any, ...]:
    """Sort key: by label fraction, then metric, then the two sides in ladder order."""
    return (c.label_fraction, c.metric, c.model_a, adapter_key(c.adapter_a), c.model_b, adapter_key(c.adapter_b))


def difference_with_ci(raw: Mapping[str, Any] | None, star: Literal["either", "positive"] = "either") -> str:
    """A paired difference (``difference``, ``ci_low``, ``ci_high``) as ``+0.042 [+0.010, +0.075]*`` for Markdown
    tables; ``[no CI]`` where the interval is missing (one test patient, too many undefined resamples).

    ``star`` marks an interval that excludes 0: on ``"either"`` side, or only above 0 (``"positive"``, where A is
    the better side). A difference without an interval is never starred.
    """
    if not raw:
        return "-"
    difference, low, high = (_number(raw, key) for key in ("difference", "ci_low", "ci_high"))
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{difference:+.3f} [no CI]"
    starred = low > 0 or (star == "either" and high < 0)
    return f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]" + ("*" if starred else "")
