"""Gradient-aggregation methods."""
