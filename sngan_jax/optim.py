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


# Adam's hyperparameters that live in the optimizer state as arrays (through
# optax.inject_hyperparams), so runs that differ only in them can be vmapped
# over a stack of states: one compiled program trains every sweep point.
HYPERPARAMS = ("lr", "b1", "b2", "eps")


def create(
    opt: Mapping[str, Any], total_steps: int, updates_per_step: int, clip: float = 0.0
) -> optax.GradientTransformation:
    """Adam with the configured betas and schedule; optionally weight clipping.

    The learning rate is ``lr`` times the decay schedule's factor; ``lr``,
    ``b1``, ``b2`` and ``eps`` are state (see ``set_hyperparams``).
    """
    schedule = learning_rate({**opt, "lr": 1.0}, total_steps, updates_per_step)

    def adam(lr, b1, b2, eps):
        return optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.scale_by_learning_rate(_times(schedule, lr)),
        )

    tx = optax.inject_hyperparams(adam)(
        lr=opt["lr"], b1=opt["b1"], b2=opt["b2"], eps=opt["eps"]
    )
    if clip > 0:
        tx = optax.chain(tx, clip_weights(clip))
    return tx


def _times(schedule, lr):
    if callable(schedule):
        return lambda count: lr * schedule(count)
    return lr * schedule


def hyperparams(opt_state: Any) -> dict[str, Any]:
    """The injected Adam hyperparameters of an optimizer state made by ``create``."""
    return _injected(opt_state).hyperparams


def set_hyperparams(opt_state: Any, values: Mapping[str, Any]) -> Any:
    """``opt_state`` with Adam's ``lr``/``b1``/``b2``/``eps`` replaced by ``values``."""
    inner = _injected(opt_state)
    new = {**inner.hyperparams}
    for name, value in values.items():
        new[name] = jnp.asarray(value, jnp.asarray(new[name]).dtype)
    inner = inner._replace(hyperparams=new)
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams"):
        return (inner, *opt_state[1:])  # chained with weight clipping
    return inner


def _injected(opt_state: Any) -> Any:
    if hasattr(opt_state, "hyperparams"):
        return opt_state
    return opt_state[0]
