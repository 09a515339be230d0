"""``medfoundry compare``: a paired bootstrap of two models' predictions, over :mod:`medfoundry.evaluate.compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def compare(
    pred_a: Annotated[Path, typer.Argument(help="predictions CSV of model A (docs: evaluate/predictions.py)")],
    pred_b: Annotated[Path, typer.Argument(help="predictions CSV of model B, same test cases")],
    metric: Annotated[
        str, typer.Option("--metric", "-m", help="auroc, accuracy, balanced_accuracy, f1, kappa, ece")
    ] = "auroc",
    n_bootstrap: Annotated[int, typer.Option("--n-bootstrap", help="paired bootstrap resamples")] = 2000,
    confidence: Annotated[float, typer.Option(help="CI level")] = 0.95,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
) -> None:
    """CI of metric(A) - metric(B) from a paired bootstrap over the patients both models were tested on."""
    from medfoundry.evaluate.compare import paired_difference
    from medfoundry.evaluate.metrics import LOWER_IS_BETTER
    from medfoundry.evaluate.predictions import align_predictions, read_predictions

    a, b = align_predictions(read_predictions(pred_a), read_predictions(pred_b))
    diff = paired_difference(a.labels, a.proba, b.proba, a.patient_ids, metric, n_bootstrap, confidence, seed)
    table = Table("", metric, f"{confidence:.0%} CI")
    table.add_row(f"A {pred_a.stem}", f"{diff.value_a:.4f}", "")
    table.add_row(f"B {pred_b.stem}", f"{diff.value_b:.4f}", "")
    table.add_row("A - B", f"{diff.value:+.4f}", f"[{diff.ci_low:+.4f}, {diff.ci_high:+.4f}]")
    out = Console()
    out.print(table)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    verdict = "yes, the gap is unlikely to be resampling noise" if diff.excludes_zero else "no"
    out.print(
        f"CI excludes 0: {verdict}; {len(set(a.patient_ids))} patients, {len(a.ids)} cases, {direction} is better; "
        f"share of resamples with the opposite sign: {diff.share_opposite:.3f}",
        highlight=False,
        soft_wrap=True,
    )
    if diff.n_skipped:
        out.print(f"{diff.n_skipped} of {n_bootstrap} resamples were undefined and skipped", highlight=False)


def register(root: typer.Typer) -> None:
    root.command("compare")(compare)
