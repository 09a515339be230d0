"""Was pre-training healthy? The loss, effective rank and (DINO / iBOT) teacher entropy and prototype use over the
run, with the thresholds that mean trouble, and every warning the collapse monitor raised. From
metadata["pretrain"] (written by ``medfoundry run``)."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from medfoundry.report.context import ReportContext
from medfoundry.report.plots import plot_health
from medfoundry.report.templating import render


def pretraining_health(ctx: ReportContext) -> Markup:
    pretrain = ctx.results.metadata.get("pretrain")
    if not isinstance(pretrain, dict):
        return Markup()
    history = [h for h in pretrain.get("monitor") or [] if isinstance(h, dict)]
    thresholds = _thresholds(pretrain.get("thresholds"))
    warnings: list[dict[str, Any]] = [w for w in pretrain.get("warnings") or [] if isinstance(w, dict)]
    figure = plot_health(history, thresholds) if history else None
    return render(
        "sections/health.html.j2",
        pretrain=pretrain,
        figure=figure,
        warnings=warnings,
        thresholds=thresholds,
        verdict=[str(line) for line in pretrain.get("verdict") or []],
    )


def _thresholds(raw: Any) -> dict[str, tuple[str, float]]:
    """ssl.monitor.HEALTH_THRESHOLDS as results.json holds it ({field: {"min" or "max": value, "meaning": ...}}),
    as (side, value) per field."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(key): (side, float(bounds[side]))
        for key, bounds in raw.items()
        if isinstance(bounds, dict)
        for side in ("min", "max")
        if isinstance(bounds.get(side), int | float)
    }
