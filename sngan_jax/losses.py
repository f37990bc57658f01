"""GAN losses on discriminator logits, and the gradient penalty.

Each loss is a pair of functions of the logits: ``d_loss(real, fake)`` for the
discriminator and ``g_loss(fake)`` for the generator, both means over the
batch. ``hinge`` is the paper's default for the ResNets; ``non_saturating``
is the standard GAN objective with the generator's -log D trick;
``wasserstein`` is the critic objective of WGAN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Loss(NamedTuple):
    d_loss: Callable[[Array, Array], Array]
    g_loss: Callable[[Array], Array]


def hinge_d(real: Array, fake: Array) -> Array:
    """``E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]``."""
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def hinge_g(fake: Array) -> Array:
    """``-E[D(G(z))]``."""
    return -jnp.mean(fake)


def non_saturating_d(real: Array, fake: Array) -> Array:
    """``-E[log sigmoid(D(x))] - E[log(1 - sigmoid(D(G(z))))]``."""
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def non_saturating_g(fake: Array) -> Array:
    """``-E[log sigmoid(D(G(z)))]``."""
    return jnp.mean(jax.nn.softplus(-fake))


def wasserstein_d(real: Array, fake: Array) -> Array:
    """``E[D(G(z))] - E[D(x)]``."""
    return jnp.mean(fake) - jnp.mean(real)


def wasserstein_g(fake: Array) -> Array:
    """``-E[D(G(z))]``."""
    return -jnp.mean(fake)


LOSSES = {
    "hinge": Loss(hinge_d, hinge_g),
    "non_saturating": Loss(non_saturating_d, non_saturating_g),
    "wasserstein": Loss(wasserstein_d, wasserstein_g),
}


def get(name: str) -> Loss:
    """The loss pair called ``name`` (one of ``LOSSES``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def gradient_penalty(
    d_fn: Callable[[Array], Array], real: Array, fake: Array, rng: Array
) -> Array:
    """``E[(||grad_x D(x_hat)||_2 - 1)^2]`` at random interpolates (WGAN-GP).

    Args:
      d_fn: maps a batch ``(N, ...)`` to logits ``(N,)``; each logit must depend
        on its own sample only (true for every discriminator here except the
        batch-normalization baseline).
      real, fake: batches of the same shape.
      rng: key for the interpolation weights, one per sample.

    Returns:
      The penalty as a scalar, without its weight (lambda, 10 in the paper).
    """
    eps = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1))
    return penalty_at(d_fn, eps * real + (1.0 - eps) * fake)


def penalty_at(d_fn: Callable[[Array], Array], x_hat: Array) -> Array:
    """The gradient penalty at given interpolates ``x_hat``."""
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(x_hat)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))
    return jnp.mean(jnp.square(norms - 1.0))
