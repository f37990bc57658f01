"""Mode coverage and sample quality on the 2-D Gaussian mixtures.

The usual protocol of GAN stability studies on these mixtures: a sample is of
high quality when it lies within three standard deviations of the nearest mode
centre; a mode is covered when at least ``min_fraction`` of all samples are
high-quality samples of that mode.
"""

from __future__ import annotations

import numpy as np

from sngan_jax.data import embedded


def mode_stats(
    points: np.ndarray, name: str, n_std: float = 3.0, min_fraction: float = 0.01
) -> dict[str, float]:
    """Scores points ``(N, 2)`` against mixture ``name`` (ring2d or grid2d).

    Returns ``modes`` (number covered), ``num_modes``, ``high_quality`` (fraction
    of samples near some mode) and ``kl_modes`` (KL divergence of the
    distribution of high-quality samples over modes from the uniform one;
    0 when they are spread evenly).
    """
    centers = embedded.mixture_centers(name)
    std = embedded.MIXTURE_STD[name]
    points = np.asarray(points, np.float64)
    dist = np.linalg.norm(points[:, None, :] - centers[None], axis=-1)
    nearest = np.argmin(dist, axis=1)
    good = dist[np.arange(len(points)), nearest] <= n_std * std
    counts = np.bincount(nearest[good], minlength=len(centers))
    covered = int(np.sum(counts >= min_fraction * len(points)))
    hist = counts / max(counts.sum(), 1)
    uniform = 1.0 / len(centers)
    kl = float(
        np.sum(np.where(hist > 0, hist * np.log(np.maximum(hist, 1e-12) / uniform), 0))
    )
    return {
        "modes": covered,
        "num_modes": len(centers),
        "high_quality": float(np.mean(good)),
        "kl_modes": kl,
    }
