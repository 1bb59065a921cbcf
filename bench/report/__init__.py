"""The HTML report of a sweep."""

from bench.report.page import best_per_budget, pareto_front, write_report

__all__ = ["best_per_budget", "pareto_front", "write_report"]
