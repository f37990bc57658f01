"""Optimizers of the two networks: Adam, learning-rate decay, weight clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(opt: Mapping[str, Any], total_steps: int, updates_per_step: int):
    """The schedule as a function of the optimizer's update count.

    ``updates_per_step`` is n_dis for the discriminator and 1 for the generator,
    so both networks decay on the clock of generator steps, as in the paper's
    ResNet runs (linear decay to 0 over ``total_steps``).
    """
    lr = opt["lr"]
    if opt["decay"] == "none":
        return lr
    if opt["decay"] == "linear":

        def schedule(count):
            step = count // updates_per_step
            return lr * jnp.clip(1.0 - step / total_steps, 0.0, 1.0)

        return schedule
    raise ValueError(
        f"unknown optimizer.decay {opt['decay']!r}; use 'linear' or 'none'"
    )


def clip_weights(bound: float) -> optax.GradientTransformation:
    """Keeps every parameter in ``[-bound, bound]`` after the update (WGAN)."""

    def update(updates, state, params):
        if params is None:
            raise ValueError("clip_weights needs the parameters in update()")
        clipped = jax.tree.map(
            lambda u, p: jnp.clip(p + u, -bound, bound) - p, updates, params
        )
        return clipped, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def create(
    opt: Mapping[str, Any], total_steps: int, updates_per_step: int, clip: float = 0.0
) -> optax.GradientTransformation:
    """Adam with the configured betas and schedule; optionally weight clipping."""
    lr = learning_rate(opt, total_steps, updates_per_step)
    tx = optax.adam(lr, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"])
    if clip > 0:
        tx = optax.chain(tx, clip_weights(clip))
    return tx
