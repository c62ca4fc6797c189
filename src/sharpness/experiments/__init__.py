"""Experiments on top of the training loop: run configurations, optimizer comparisons, reports."""

from sharpness.experiments.compare import compare, format_table, summarize
from sharpness.experiments.config import CompareConfig, ConfigError, RunConfig, build_config
from sharpness.experiments.report import write_report
from sharpness.experiments.runner import run_training
from sharpness.experiments.stats import mean_ci95

__all__ = [
    "CompareConfig",
    "ConfigError",
    "RunConfig",
    "build_config",
    "compare",
    "format_table",
    "mean_ci95",
    "run_training",
    "summarize",
    "write_report",
]
