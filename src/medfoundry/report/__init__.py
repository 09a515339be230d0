"""The benchmark report, rendered from results.json alone: tables and prose, plots, and the HTML page."""

from medfoundry.report.comparisons import (
    Comparison,
    comparison_sentence,
    comparisons_from_metadata,
    describe_comparison,
)
from medfoundry.report.html import REPORT_SECTIONS, TASK_SECTIONS, render_report
from medfoundry.report.plots import plot_adaptation_ladder, plot_label_efficiency, png_base64, png_bytes
from medfoundry.report.summary import (
    ADAPTER_ORDER,
    METRIC_LABELS,
    REPORT_METRICS,
    LadderPoint,
    format_fraction,
    format_markdown_tables,
    format_summary_text,
    ladder_points,
    metric_label,
    primary_metric,
    summarise_table,
    table_metrics,
)

__all__ = [
    "ADAPTER_ORDER",
    "METRIC_LABELS",
    "REPORT_METRICS",
    "REPORT_SECTIONS",
    "TASK_SECTIONS",
    "Comparison",
    "LadderPoint",
    "comparison_sentence",
    "comparisons_from_metadata",
    "describe_comparison",
    "format_fraction",
    "format_markdown_tables",
    "format_summary_text",
    "ladder_points",
    "metric_label",
    "plot_adaptation_ladder",
    "plot_label_efficiency",
    "png_base64",
    "png_bytes",
    "primary_metric",
    "render_report",
    "summarise_table",
    "table_metrics",
]
