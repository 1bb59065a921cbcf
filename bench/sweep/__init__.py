"""A sweep: a suite expands into cells, the runner samples and measures each one, the store keeps its row."""
