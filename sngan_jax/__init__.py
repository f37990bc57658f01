"""sngan-jax: Spectral Normalization for GANs (Miyato et al., ICLR 2018) in JAX."""

__version__ = "0.1.0"
