"""The ``medfoundry`` command: a thin typer layer over the Python API.

Errors caused by input (missing files, bad configs, unknown models) print one line and exit 1;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from medfoundry.cli_segment import segment_probe
from medfoundry.cli_vlm import register as register_vlm_commands
from medfoundry.cli_wsi import wsi_app
from medfoundry.errors import MedfoundryError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pre-train, adapt and benchmark medical imaging foundation models.",
)
data_app = typer.Typer(no_args_is_help=True, help="Get and inspect datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Backbones and checkpoints.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(wsi_app, name="wsi", help="Whole-slide images: tile and embed (pathology).")
app.command("segment-probe")(segment_probe)
console = Console(stderr=True)
_state = {"debug": False}

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML recipe (see configs/)")]
OverridesOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. pretrain.epochs=5")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="more log lines")] = False,
) -> None:
    _state["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


def _experiment_config(config: Path | None, overrides: list[str] | None, output: Path | None):  # noqa: ANN202
    from medfoundry.config import ExperimentConfig, load_config

    values = list(overrides or [])
    if output is not None:
        values.append(f"output_dir={output}")
    return load_config(ExperimentConfig, config, values)


@app.command()
def run(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output folder")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore finished stages and start over")] = False,
) -> None:
    """Run the whole pipeline: pre-train, embed, adapt, baselines, results.json and report.html."""
    cfg = _experiment_config(config, overrides, output)  # before the slow import: config typos fail fast
    from medfoundry.experiment import run_experiment

    if fresh and cfg.output_dir.exists():
        import shutil

        shutil.rmtree(cfg.output_dir)
    out = run_experiment(cfg, resume=True, echo=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print(f"\n[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.results_path.resolve()}")
    console.print(f"Took {out.durations['total']:.0f} s")


@app.command("eval")
def eval_suite(
    suite: Annotated[Path, typer.Argument(help="suite YAML (see configs/suites/)")],
    overrides: OverridesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output folder")] = None,
) -> None:
    """Run a benchmark suite: tasks x encoders x adapters x label fractions x seeds (resumes where it stopped)."""
    from medfoundry.config import SuiteConfig, load_config

    values = list(overrides or [])
    if output is not None:
        values.append(f"output_dir={output}")
    cfg = load_config(SuiteConfig, suite, values)  # before the slow import: config typos fail fast
    from medfoundry.suite import run_suite

    out = run_suite(cfg, show_progress=sys.stderr.isatty(), echo=lambda line: console.print(line, highlight=False))
    console.print(f"\n{out.cells_computed} cells computed, {out.cells_reused} reused")
    console.print(f"[bold green]Report:[/] {out.report_path.resolve()}")
    console.print(f"[bold green]Results:[/] {out.results_path.resolve()}")
    console.print(f"Took {out.durations['total']:.0f} s")


def pretrain_overrides(
    domain: str | None,
    stop_on_collapse: bool,
    overrides: list[str] | None,
    method: str | None = None,
    data: str | None = None,
) -> list[str]:
    """The pretrain command's options as dotted overrides, placed first so that ``-s`` overrides still win."""
    values = [f"pretrain.views.domain={domain}"] if domain is not None else []
    if method is not None:
        values.append(f"pretrain.method={method}")
    if data is not None:
        # Quoted: a spec such as "wsi:slide.svs" would otherwise be read as a YAML mapping.
        values.append(f"data.source={json.dumps(data)}")
    if stop_on_collapse:
        values.append("pretrain.stop_on_collapse=true")
    return [*values, *(overrides or [])]


@app.command()
def pretrain(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output folder")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")] = True,
    domain: Annotated[
        str | None,
        typer.Option(
            "--domain",
            help="view preset: natural, pathology, radiology, ophthalmology or oct (docs/views.md); "
            "-s pretrain.views.<field>=... overrides single fields",
        ),
    ] = None,
    stop_on_collapse: Annotated[
        bool, typer.Option("--stop-on-collapse", help="stop when the collapse monitor fires")
    ] = False,
    method: Annotated[
        str | None, typer.Option("--method", help="dino, ibot, simclr, mocov3, byol, mae or clip (pretrain.method)")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="dataset spec to pre-train on (data.source); clip: pairs.csv|json, vqa_rad:PATH"
        ),
    ] = None,
) -> None:
    """SSL pre-training only; writes <output>/pretrain/encoder (a checkpoint folder); --method clip: pretrain/clip."""
    from medfoundry.experiment import run_pretraining

    cfg = _experiment_config(config, pretrain_overrides(domain, stop_on_collapse, overrides, method, data), output)
    state = cfg.output_dir / "pretrain" / "state" / "last.pt"
    if not resume:
        state.unlink(missing_ok=True)  # missing_ok: under torchrun every rank removes it
    result = run_pretraining(cfg, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    status = "finished" if result.finished else f"stopped at step {result.steps}/{result.total_steps}"
    console.print(
        f"{status}; {result.images_per_second:.1f} img/s; encoder: {result.encoder_dir if result.finished else '-'}"
    )
    if result.collapsed:
        console.print("[yellow]warning: the collapse monitor fired; see log.jsonl[/]")


@app.command("embed")
def embed_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint folder, preset or timm name")],
    data: Annotated[str, typer.Option("--data", "-d", help="dataset spec: file.npz, file.csv, folder, prefix:path")],
    out: Annotated[Path, typer.Option("--out", help="output HDF5 file")],
    split: Annotated[str, typer.Option(help="split to embed")] = "test",
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 128,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers")] = 0,
    img_size: Annotated[int | None, typer.Option(help="input size for a preset or timm name")] = None,
) -> None:
    """Embed one split into HDF5 (features, ids, labels); reused when weights, preprocessing and data match.

    Under torchrun the ranks embed shards and rank 0 merges them into the same file (docs/distributed.md).
    """
    from medfoundry.adapt.embed import embed
    from medfoundry.data.registry import load_dataset
    from medfoundry.models.checkpoint import load_encoder_or_build

    splits = load_dataset(data)
    if split not in splits:
        raise MedfoundryError(f"no split '{split}' (found {sorted(splits)})", data)
    images = splits[split]
    encoder = load_encoder_or_build(model, images.num_channels, img_size)
    result = embed(encoder, images, out, batch_size, num_workers)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    verb = "reused" if result.reused else f"wrote in {result.seconds:.1f} s"
    console.print(f"{out}: {result.features.shape[0]} x {result.features.shape[1]} features ({verb})")


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json")],
    out: Annotated[Path | None, typer.Option("--out", help="report.html (default: beside results.json)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print each task's headline metric as Markdown")] = False,
) -> None:
    """Render report.html from results.json alone."""
    from medfoundry.evaluate.report import format_markdown_tables, format_summary_text, render_report, summarise_table
    from medfoundry.evaluate.results import read_results

    res = read_results(results)
    if markdown:
        print(format_markdown_tables(res))
    path = render_report(res, out or results.with_name("report.html"))
    console.print(format_summary_text(summarise_table(res)), highlight=False, soft_wrap=True)
    console.print(f"Report: {path.resolve()}")


@app.command()
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


@app.command("mil")
def mil_cv(
    features: Annotated[Path, typer.Argument(help="folder of per-slide feature HDF5 files (medfoundry wsi embed)")],
    labels: Annotated[Path, typer.Argument(help="CSV with columns slide_id, patient_id, label")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for results.json and report.html")],
    models: Annotated[str, typer.Option(help="comma-separated: mean, abmil, gated_abmil, transmil")] = "abmil",
    folds: Annotated[int, typer.Option(help="cross-validation folds, split by patient")] = 5,
    task: Annotated[str, typer.Option(help="task name in results and report")] = "slides",
    seed: Annotated[int, typer.Option(help="fold and training seed")] = 0,
    heatmaps: Annotated[bool, typer.Option(help="out-of-fold attention over each slide's thumbnail (PNG)")] = True,
) -> None:
    """Slide-level MIL on cached tile features, cross-validated by patient, into results.json and report.html."""
    from medfoundry.evaluate.report import format_summary_text, render_report, summarise_table
    from medfoundry.mil.data import load_bags
    from medfoundry.mil.train import run_mil_cv

    bags = load_bags(features, labels)
    names = [name.strip() for name in models.split(",") if name.strip()]
    results = run_mil_cv(
        bags,
        names,
        task=task,
        features_name=features.name,
        n_folds=folds,
        seed=seed,
        out_path=out / "results.json",
        heatmaps_dir=out / "heatmaps" if heatmaps else None,
    )
    report = render_report(results, out / "report.html", title=f"medfoundry MIL: {task}")
    console.print(format_summary_text(summarise_table(results)), highlight=False, soft_wrap=True)
    console.print(f"[bold green]Report:[/] {report.resolve()}")


@data_app.command("fetch")
def data_fetch(
    source: Annotated[str, typer.Argument(help="collection (medmnist)")],
    name: Annotated[str, typer.Argument(help="dataset name, e.g. breastmnist")],
    size: Annotated[int, typer.Option(help="28, 64, 128 or 224")] = 28,
    dest: Annotated[Path, typer.Option(help="download folder")] = Path("data"),
) -> None:
    """Download an official dataset file with md5 verification (says so clearly when offline)."""
    from medfoundry.data.fetch import fetch_medmnist

    if source != "medmnist":
        raise MedfoundryError(f"unknown collection '{source}'; known: medmnist")
    path = fetch_medmnist(name, size, dest, progress=True)
    console.print(f"{path} (md5 verified)")


@data_app.command("info")
def data_info(spec: Annotated[str, typer.Argument(help="dataset spec")]) -> None:
    """Splits, sizes, channels and label counts of a dataset."""
    import numpy as np

    from medfoundry.data.registry import load_dataset

    table = Table("split", "images", "shape", "labels")
    for split, images in load_dataset(spec).items():
        counts = "-" if images.labels is None or images.labels.ndim != 1 else str(np.bincount(images.labels).tolist())
        table.add_row(split, str(len(images)), str(tuple(images.load(0).shape)), counts)
    Console().print(table)


@models_app.command("list")
def models_list() -> None:
    """Named backbone presets (any timm model name works too)."""
    from medfoundry.models.backbones import list_backbones
    from medfoundry.models.public import list_public_models

    table = Table("name", "timm architecture", "description", title="Backbone presets (random init)")
    for row in list_backbones():
        table.add_row(*row)
    Console().print(table)
    public = Table("name", "model", "domain", "token", "licence", title="Public foundation models (local weights)")
    for entry in list_public_models():
        # The full licence text (with its conditions) is in `models show NAME`.
        licence = entry.licence.split(" (")[0].split(";")[0]
        public.add_row(entry.name, entry.title, entry.domain, entry.token, licence)
    Console().print(public)
    Console().print("Load one with -m public:NAME:PATH (a local file or snapshot folder); details: models show NAME")


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="public model name (see `models list`)")]) -> None:
    """Architecture, preprocessing, token, licence and weight source of a public foundation model."""
    from medfoundry.models.public import get_public_model

    entry = get_public_model(name)
    table = Table("field", "value", title=entry.title, show_header=False)
    size = f"{entry.input_size} px" if entry.input_size else "any (fully convolutional)"
    rows = {
        "name": entry.name,
        "domain": entry.domain,
        "architecture": entry.architecture,
        "timm builder": f"{entry.timm_name} {json.dumps(dict(entry.timm_kwargs))}",
        "input": f"{entry.in_chans} channel(s), {size}",
        "normalisation": f"mean {list(entry.mean)}, std {list(entry.std)} (on 0..1 values)",
        "token": f"{entry.token} (Encoder pool '{entry.pool}')",
        "licence": entry.licence,
        "weights": entry.weights,
        "usual file names": ", ".join(entry.weight_files) or "-",
        "key layout": entry.key_format,
        "test variant": json.dumps(dict(entry.test_kwargs)),
        "notes": entry.notes or "-",
        "load with": f"-m public:{entry.name}:/path/to/weights",
    }
    for field, value in rows.items():
        table.add_row(field, escape(value))
    Console().print(table)


@models_app.command("export")
def models_export(
    checkpoint_dir: Annotated[Path, typer.Argument(help="checkpoint folder (config.json + model.safetensors)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder: timm / Hugging Face layout")],
    licence: Annotated[str, typer.Option(help="licence written to the card and config")] = "apache-2.0",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
) -> None:
    """Export a checkpoint as a timm-loadable folder (safetensors, timm config.json, README.md model card)."""
    from medfoundry.models.export import export_checkpoint

    out = export_checkpoint(checkpoint_dir, out_dir, licence=licence, overwrite=overwrite)
    console.print(f"{out}: checked with timm; timm.create_model('local-dir:{out.resolve()}', pretrained=True)")


register_vlm_commands(app)  # zero-shot, retrieval (after the pipeline commands in --help)


def main() -> None:
    try:
        app()
    except MedfoundryError as error:
        if _state["debug"]:
            raise
        # soft_wrap: one line however long, not wrapped at the console width (80 when piped).
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted; finished stages and checkpoints are kept, run again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
