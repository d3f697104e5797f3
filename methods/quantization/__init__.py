"""Quantization methods and the grid they share."""
