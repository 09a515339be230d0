"""The sentence a reader looks for first: did pre-training pay off against its own random initialisation and against
a network trained from scratch on the same labels, at each label budget? Read from the paired comparisons alone."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from medfoundry.report.comparisons import Comparison
from medfoundry.report.context import TaskContext
from medfoundry.report.templating import render

SCRATCH_ADAPTER = "supervised"


@dataclass(frozen=True)
class Verdict:
    """One encoder + probe against one baseline, over the label budgets both ran at."""

    model: str
    adapter: str
    baseline: str
    wins: list[Comparison]
    losses: list[Comparison]
    ties: list[Comparison]

    @property
    def total(self) -> int:
        return len(self.wins) + len(self.losses) + len(self.ties)


def _won(c: Comparison) -> bool | None:
    """True when A is significantly better, False when significantly worse, None for a tie (CI holds 0)."""
    return c.favours_a if c.significant else None


def _verdicts(ctx: TaskContext) -> list[Verdict]:
    baseline_encoder = ctx.report.results.metadata.get("config", {}).get("comparisons", {}).get("baseline_encoder")
    groups: dict[tuple[str, str, str], list[Comparison]] = {}
    for c in ctx.comparisons:
        if c.model_a == baseline_encoder:
            continue  # the random initialisation is a baseline, not a pre-trained encoder
        against_init = baseline_encoder is not None and c.model_b == baseline_encoder and c.adapter_b == c.adapter_a
        against_scratch = c.adapter_b == SCRATCH_ADAPTER
        if against_init or against_scratch:
            label = f"{c.model_b} + {c.adapter_b}" if against_scratch else f"{c.model_b} (its starting weights)"
            groups.setdefault((c.model_a, c.adapter_a, label), []).append(c)
    verdicts = []
    for (model, adapter, baseline), found in groups.items():
        found = sorted(found, key=lambda c: c.label_fraction)
        outcome = [_won(c) for c in found]
        verdicts.append(
            Verdict(
                model,
                adapter,
                baseline,
                wins=[c for c, o in zip(found, outcome, strict=True) if o is True],
                losses=[c for c, o in zip(found, outcome, strict=True) if o is False],
                ties=[c for c, o in zip(found, outcome, strict=True) if o is None],
            )
        )
    return verdicts


def verdict(ctx: TaskContext) -> Markup:
    """One line per (encoder + probe, baseline): at how many label budgets it is significantly better or worse."""
    found = _verdicts(ctx)
    if not found:
        return Markup()
    return render("sections/verdict.html.j2", verdicts=found, metric=ctx.headline)
