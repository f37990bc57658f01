"""Evaluation metrics. ``toy`` scores samples of the 2-D Gaussian mixtures."""
