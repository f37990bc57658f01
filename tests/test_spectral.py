"""Power iteration, spectral_normalize and exact_sigma against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sngan_jax import spectral


def random_kernel(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def ill_conditioned(seed, m, n, cond=1e4):
    """A matrix with singular values spread geometrically from 1 to 1/cond."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(m, m)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    s = np.geomspace(1.0, 1.0 / cond, k)
    return jnp.asarray((q1[:, :k] * s) @ q2[:k], jnp.float32)


def converged(w, steps=2000, seed=1):
    u0 = jax.random.normal(jax.random.PRNGKey(seed), (w.shape[-1],))
    return spectral.spectral_normalize(w, u0, n_steps=steps)


@pytest.mark.parametrize(
    "w",
    [
        random_kernel(0, (64, 32)),
        random_kernel(1, (3, 3, 16, 32)),
        random_kernel(2, (4, 4, 8, 8)),
        ill_conditioned(3, 48, 40),
        ill_conditioned(4, 20, 60, cond=1e6),
    ],
    ids=["dense", "conv3x3", "conv4x4", "ill-tall", "ill-wide"],
)
def test_sigma_matches_svd_after_enough_steps(w):
    w_sn, _, sigma = converged(w)
    exact = spectral.exact_sigma(w)
    assert float(jnp.abs(sigma - exact) / exact) < 1e-4
    # The normalized kernel then has spectral norm 1.
    assert abs(float(spectral.exact_sigma(w_sn)) - 1.0) < 1e-3
    assert w_sn.shape == w.shape


def test_exact_sigma_uses_the_output_axis_as_columns():
    w = random_kernel(5, (3, 3, 4, 6))
    mat = np.asarray(w).reshape(3 * 3 * 4, 6)
    assert np.isclose(float(spectral.exact_sigma(w)), np.linalg.norm(mat, 2), rtol=1e-5)
    values = spectral.singular_values(w)
    assert values.shape == (6,)
    assert np.all(np.diff(np.asarray(values)) <= 0)


def test_one_step_per_call_tracks_a_slowly_changing_kernel():
    w = random_kernel(6, (32, 16))
    direction = random_kernel(7, (32, 16))
    _, u, _ = converged(w)
    errors = []
    for _ in range(200):
        w = w + 1e-3 * direction
        _, u, sigma = spectral.spectral_normalize(w, u, n_steps=1)
        exact = spectral.exact_sigma(w)
        errors.append(float(jnp.abs(sigma - exact) / exact))
    assert max(errors) < 1e-3, max(errors)


def test_update_false_keeps_u_and_is_deterministic():
    w = random_kernel(8, (3, 3, 8, 16))
    u = jax.random.normal(jax.random.PRNGKey(9), (16,))
    u = u / jnp.linalg.norm(u)
    a = spectral.spectral_normalize(w, u, update=False)
    b = spectral.spectral_normalize(w, u, update=False)
    assert np.array_equal(a[1], u)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    # With update=True the vector moves.
    assert not np.array_equal(spectral.spectral_normalize(w, u)[1], u)


def test_sigma_never_exceeds_the_true_value():
    # Power iteration estimates are lower bounds of the top singular value.
    w = random_kernel(10, (40, 30))
    u = jax.random.normal(jax.random.PRNGKey(11), (30,))
    exact = float(spectral.exact_sigma(w))
    for _ in range(10):
        _, u, sigma = spectral.spectral_normalize(w, u)
        assert float(sigma) <= exact * (1 + 1e-6)


def loss_of(w, u, target):
    w_sn, _, _ = spectral.spectral_normalize(w, u, n_steps=1)
    return jnp.sum(jnp.sin(w_sn * target))


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.PRNGKey(12), (5, 4), jnp.float64)
        u = jax.random.normal(jax.random.PRNGKey(13), (4,), jnp.float64)
        target = jax.random.normal(jax.random.PRNGKey(14), (5, 4), jnp.float64)
        grad = jax.grad(loss_of)(w, u, target)
        # u is a constant of the function: the u that spectral_normalize
        # computes from w is stop-gradiented, so the finite differences must
        # also hold u and v fixed at the values computed from the unperturbed w.
        u1, v1 = spectral.power_iteration(w, u, 1)

        def fixed_uv_loss(w):
            sigma = v1 @ w @ u1
            return jnp.sum(jnp.sin(w / sigma * target))

        h = 1e-6
        numeric = np.zeros(w.shape)
        for idx in np.ndindex(*w.shape):
            e = jnp.zeros(w.shape, jnp.float64).at[idx].set(h)
            numeric[idx] = (fixed_uv_loss(w + e) - fixed_uv_loss(w - e)) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-6, atol=1e-9)


def test_gradient_is_equation_12():
    """dL/dW = (G - <G, W_sn> v u^T) / sigma, G = dL/dW_sn (paper, eq. 12).

    In the matrix view of this module (rows: inputs, columns: outputs),
    sigma = v^T M u, so the rank-one term is v u^T.
    """
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.PRNGKey(15), (3, 3, 2, 5), jnp.float64)
        u = jax.random.normal(jax.random.PRNGKey(16), (5,), jnp.float64)
        target = jax.random.normal(jax.random.PRNGKey(17), w.shape, jnp.float64)
        grad = jax.grad(loss_of)(w, u, target)

        w_sn, _, sigma = spectral.spectral_normalize(w, u, n_steps=1)
        u1, v1 = spectral.power_iteration(w, u, 1)
        g = jnp.cos(w_sn * target) * target  # dL/dW_sn
        g_mat = g.reshape(-1, 5)
        lam = jnp.sum(g * w_sn)
        analytic = (g_mat - lam * jnp.outer(v1, u1)) / sigma
        np.testing.assert_allclose(
            np.asarray(grad).reshape(-1, 5),
            np.asarray(analytic),
            rtol=1e-10,
            atol=1e-12,
        )

        # And it is not the gradient one gets by differentiating through u, v:
        # the full derivative adds terms, so the two must differ.
        def through_uv(w):
            mat = w.reshape(-1, 5)
            uu = u / jnp.linalg.norm(u)
            v = mat @ uu
            v = v / jnp.linalg.norm(v)
            uu = v @ mat
            uu = uu / jnp.linalg.norm(uu)
            return jnp.sum(jnp.sin(w / (v @ mat @ uu) * target))

        assert not np.allclose(jax.grad(through_uv)(w), grad, rtol=1e-6)


def test_works_under_jit_vmap_and_pmap():
    kernels = random_kernel(18, (4, 3, 3, 8, 16))
    us = jax.random.normal(jax.random.PRNGKey(19), (4, 16))
    one_by_one = [
        spectral.spectral_normalize(k, u) for k, u in zip(kernels, us, strict=True)
    ]

    def fn(k, u):
        return spectral.spectral_normalize(k, u)

    batched = jax.jit(jax.vmap(fn))(kernels, us)
    assert jax.local_device_count() == 4
    mapped = jax.pmap(fn)(kernels, us)
    for i, expected in enumerate(one_by_one):
        for got in (batched, mapped):
            for x, y in zip(got, expected, strict=True):
                np.testing.assert_allclose(x[i], y, rtol=1e-5, atol=1e-6)


def test_rejects_vectors_and_wrong_u():
    with pytest.raises(ValueError, match="rank >= 2"):
        spectral.spectral_normalize(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="needs a vector of shape"):
        spectral.spectral_normalize(jnp.ones((3, 4)), jnp.ones(3))
