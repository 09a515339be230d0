"""Evaluation: metrics with patient-level bootstrap CIs, cells, paired comparisons and the results.json schema."""
