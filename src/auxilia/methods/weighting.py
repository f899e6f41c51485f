"""Loss-weighting methods."""
