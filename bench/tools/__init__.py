"""Measuring commands, each `python -m bench.tools.NAME`: figures taken as ratios within one run."""
