"""Command-line tools for measuring parts of the harness (run them with ``python -m bench.tools.<name>``)."""
