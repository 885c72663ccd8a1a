"""Evaluation: generation, task metrics, the evaluation report and the review page."""
