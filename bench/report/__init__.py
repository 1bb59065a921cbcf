"""The HTML report of a sweep: data (series, means, the best per budget), figures, and the page."""

from bench.report.data import best_per_budget, pareto_front
from bench.report.page import write_report

__all__ = ["best_per_budget", "pareto_front", "write_report"]
