"""Evaluation: metrics with patient-level bootstrap CIs, the results.json schema and the HTML report."""
