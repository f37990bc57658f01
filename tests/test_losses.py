"""Each loss against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sngan_jax import losses

REAL = jnp.array([2.0, 0.5, -1.0])
FAKE = jnp.array([-2.0, 0.0, 1.5])


def test_hinge():
    # real: max(0, 1 - x) = 0, 0.5, 2 -> mean 2.5/3; fake: max(0, 1 + x) = 0, 1, 2.5
    assert float(losses.hinge_d(REAL, FAKE)) == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert float(losses.hinge_g(FAKE)) == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def softplus(x):
    return math.log1p(math.exp(x))


def test_non_saturating():
    d = np.mean([softplus(-2.0), softplus(-0.5), softplus(1.0)]) + np.mean(
        [softplus(-2.0), softplus(0.0), softplus(1.5)]
    )
    assert float(losses.non_saturating_d(REAL, FAKE)) == pytest.approx(d, rel=1e-6)
    g = np.mean([softplus(2.0), softplus(0.0), softplus(-1.5)])
    assert float(losses.non_saturating_g(FAKE)) == pytest.approx(g, rel=1e-6)


def test_wasserstein():
    assert float(losses.wasserstein_d(REAL, FAKE)) == pytest.approx(-0.5 / 3 - 1.5 / 3)
    assert float(losses.wasserstein_g(FAKE)) == pytest.approx(0.5 / 3)


def test_gradient_penalty_of_a_linear_critic():
    # D(x) = <a, x> has gradient a everywhere: penalty (||a|| - 1)^2 = (5 - 1)^2.
    a = jnp.array([3.0, 4.0])

    def d_fn(x):
        return x @ a

    real = jnp.ones((6, 2))
    fake = jnp.zeros((6, 2))
    penalty = losses.gradient_penalty(d_fn, real, fake, jax.random.PRNGKey(0))
    assert float(penalty) == pytest.approx(16.0)


def test_gradient_penalty_of_a_quadratic_critic():
    # D(x) = ||x||^2 / 2 has gradient x: at x_hat = (1, 0) and (0, 3) the
    # norms are 1 and 3, penalty mean((0)^2, (2)^2) = 2.
    def d_fn(x):
        return 0.5 * jnp.sum(x**2, axis=1)

    x_hat = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    assert float(losses.penalty_at(d_fn, x_hat)) == pytest.approx(2.0)


def test_get_names_every_loss():
    for name in ("hinge", "non_saturating", "wasserstein"):
        assert losses.get(name) is losses.LOSSES[name]
    with pytest.raises(ValueError, match="choose one of"):
        losses.get("least_squares")
