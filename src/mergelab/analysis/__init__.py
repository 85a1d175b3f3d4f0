"""Analyses of weights: magnitude statistics and averaging bounds, linear-classifier templates."""
