"""sngan-jax: Spectral Normalization for GANs (Miyato et al., ICLR 2018) in JAX.

In a notebook: ``run = sngan_jax.load(workdir)``, then ``run.sample(64)`` and
``sngan_jax.image_grid(...)``.
"""

from sngan_jax.images import image_grid
from sngan_jax.runs import Run, load

__version__ = "0.1.0"
__all__ = ["Run", "image_grid", "load"]
