"""Measuring a cell's samples: metrics, feature spaces, distances, and the reference ODE solution."""
