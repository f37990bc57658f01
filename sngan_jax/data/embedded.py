"""Data sets that need no download: 2-D Gaussian mixtures and 8x8 digits.

- ``ring2d``: 8 Gaussians evenly spaced on a circle of radius 2, std 0.02.
- ``grid2d``: 25 Gaussians centred on {-4, -2, 0, 2, 4}^2, std 0.05.
- ``digits``: the 1,797 handwritten digits (8x8, 17 grey levels) that ship
  with scikit-learn, as uint8 images (N, 8, 8, 1) with labels 0-9.
"""

from __future__ import annotations

import numpy as np


def mixture_centers(name: str) -> np.ndarray:
    """Mode centres ``(K, 2)`` of the named Gaussian mixture."""
    if name == "ring2d":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([2 * np.cos(angles), 2 * np.sin(angles)], axis=1)
    if name == "grid2d":
        ticks = np.arange(-4.0, 5.0, 2.0)
        return np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    raise ValueError(f"unknown mixture {name!r}; choose ring2d or grid2d")


MIXTURE_STD = {"ring2d": 0.02, "grid2d": 0.05}


def sample_mixture(name: str, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` points ``(num, 2)`` float32 from the named mixture, equal weights."""
    centers = mixture_centers(name)
    idx = rng.integers(len(centers), size=num)
    noise = rng.normal(size=(num, 2)) * MIXTURE_STD[name]
    return (centers[idx] + noise).astype(np.float32)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images ``(1797, 8, 8, 1)`` and labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    # Pixel values are counts 0..16 of an original 4x4 block; spread to 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images[..., None], digits.target.astype(np.int32)
