"""Evaluation: the FID Inception network, FID/IS/KID, and offline metrics.

- ``inception``: a Flax port of the Inception-v3 used for FID.
- ``weights``: reading, checking and caching its published weights.
- ``metrics``: FID, Inception Score, KID and intra-FID from features.
- ``toy`` and ``digits``: metrics for the embedded data sets, no download.
"""

from __future__ import annotations

import os

# Where downloaded weights, converted weights and reference statistics live.
CACHE_ENV = "SNGAN_JAX_CACHE"


def cache_dir(*parts: str) -> str:
    """``$SNGAN_JAX_CACHE`` (else ``$XDG_CACHE_HOME/sngan_jax``, else
    ``~/.cache/sngan_jax``) joined with ``parts``; created if missing."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "sngan_jax")
    path = os.path.join(os.path.expanduser(root), *parts)
    os.makedirs(path, exist_ok=True)
    return path
