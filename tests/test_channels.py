"""Per-channel sums as products with ones, and the batch norm built on them."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sngan_jax import channels

KEY = jax.random.PRNGKey(0)


def _bias_and_sum_loss(x, bias, weights):
    y = channels.add_bias(jnp.tanh(x), bias)
    return jnp.sum(weights * jnp.tanh(y)) + jnp.sum(jnp.sin(channels.channel_sum(y)))


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (7, 4), (2, 3, 5)])
def test_sums_by_product_equal_plain_sums_to_second_order(shape):
    """Values, gradients, and gradients of a gradient norm (as in the penalty)."""

    def penalty(x, bias, weights):
        grad_x = jax.grad(_bias_and_sum_loss)(x, bias, weights)
        return jnp.sum(jnp.square(grad_x))

    def evaluate():
        x = jax.random.normal(KEY, shape, jnp.float64)
        bias = jax.random.normal(jax.random.fold_in(KEY, 1), shape[-1:], jnp.float64)
        weights = jax.random.normal(jax.random.fold_in(KEY, 2), shape, jnp.float64)
        return [
            channels.channel_sum(x),
            channels.expand(bias, shape),
            *jax.grad(_bias_and_sum_loss, argnums=(0, 1))(x, bias, weights),
            *jax.grad(penalty, argnums=(0, 1))(x, bias, weights),
        ]

    with jax.enable_x64(True):
        x = jax.random.normal(KEY, shape, jnp.float64)
        got = evaluate()
        with channels.plain():
            want = evaluate()
    np.testing.assert_allclose(
        got[0], np.sum(np.asarray(x), tuple(range(len(shape) - 1))), rtol=1e-12
    )
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_cpu_takes_the_product_form_and_plain_does_not(jaxpr_operations):
    x, bias = jnp.ones((4, 3, 3, 5)), jnp.ones((5,))
    grad = jax.grad(_bias_and_sum_loss, argnums=(0, 1))
    assert jax.default_backend() == "cpu"
    per_channel = {("reduce_sum", (5,)), ("dot_general", (5,))}
    with channels.plain():
        assert jaxpr_operations(grad, x, bias, jnp.ones_like(x)) & per_channel == {
            ("reduce_sum", (5,))
        }
    assert jaxpr_operations(grad, x, bias, jnp.ones_like(x)) & per_channel == {
        ("dot_general", (5,))
    }


def test_sums_under_vmap_and_in_bfloat16():
    x = jax.random.normal(KEY, (3, 4, 6, 6, 8))  # a leading axis of sweep points
    bias = jax.random.normal(KEY, (3, 8))
    got = jax.vmap(lambda x, b: channels.channel_sum(channels.add_bias(x, b)))(x, bias)
    want = np.sum(np.asarray(x) + np.asarray(bias)[:, None, None, None], (1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    x16 = x[0].astype(jnp.bfloat16)
    grad = jax.grad(lambda b: jnp.sum(channels.add_bias(x16, b).astype(jnp.float32)))
    bias_grad = grad(bias[0].astype(jnp.bfloat16))
    assert bias_grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(bias_grad.astype(np.float32), np.full(8, 4 * 6 * 6))


class _Parent(nn.Module):
    """Two automatically named batch norms, as the generators create them."""

    make: type
    kwargs: dict

    @nn.compact
    def __call__(self, x, train):
        for _ in range(2):
            x = nn.relu(self.make(use_running_average=not train, **self.kwargs)(x))
        return x


BN_CASES = [
    ((6, 5, 4, 3), {"momentum": 0.9}),
    ((8, 12), {"momentum": 0.9}),  # the dense layer's batch norm
    ((6, 5, 4, 3), {"momentum": 0.9, "use_scale": False, "use_bias": False}),
    ((6, 5, 4, 3), {}),  # flax's defaults
]


@pytest.mark.parametrize("shape,kwargs", BN_CASES)
def test_batch_norm_equals_flax_batch_norm(shape, kwargs):
    """Same variables, outputs, running averages and gradients, in float64."""
    ours, theirs = _Parent(channels.BatchNorm, kwargs), _Parent(nn.BatchNorm, kwargs)

    def run(module, variables, x, weights):
        def loss(params, x):
            y, updates = module.apply(
                {**variables, "params": params}, x, True, mutable=["batch_stats"]
            )
            return jnp.sum(weights * jnp.tanh(y)), (y, updates)

        grads, (y, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), x
        )
        evaluated = module.apply({**variables, **updates}, x, False)
        return y, updates, grads, evaluated

    with jax.enable_x64(True):
        x = 3.0 + 2.0 * jax.random.normal(KEY, shape, jnp.float64)
        weights = jax.random.normal(jax.random.fold_in(KEY, 1), shape, jnp.float64)
        variables = theirs.init(KEY, x, True)
        ours_init = ours.init(KEY, x, True)
        assert jax.tree.structure(ours_init) == jax.tree.structure(variables)
        assert "BatchNorm_1" in variables["batch_stats"]
        for a, b in zip(
            jax.tree.leaves(ours_init), jax.tree.leaves(variables), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        # Parameters away from their initial values, so that every term counts.
        variables = jax.tree.map(
            lambda v: (
                v + 0.3 * jax.random.normal(jax.random.fold_in(KEY, v.size), v.shape)
            ),
            variables,
        )
        got, want = run(ours, variables, x, weights), run(theirs, variables, x, weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_batch_norm_output_dtype_follows_flax():
    x = jax.random.normal(KEY, (4, 3, 3, 5)).astype(jnp.bfloat16)
    for dtype in (None, jnp.bfloat16):
        for module in (channels.BatchNorm, nn.BatchNorm):
            bn = module(use_running_average=False, dtype=dtype)
            y, _ = bn.apply(bn.init(KEY, x), x, mutable=["batch_stats"])
            assert y.dtype == (dtype or jnp.float32), (module, dtype)


def test_batch_norm_averages_statistics_across_devices():
    """Under pmap with ``axis_name``: as flax, and as one batch on one device."""
    n = jax.local_device_count()
    assert n == 4
    x = 1.0 + jax.random.normal(KEY, (n, 5, 4, 4, 3))

    def train_call(module_type, axis_name):
        module = module_type(use_running_average=False, axis_name=axis_name)
        variables = module.init(KEY, x[0])

        def apply(x):
            return module.apply(variables, x, mutable=["batch_stats"])

        return apply

    got = jax.pmap(train_call(channels.BatchNorm, "i"), axis_name="i")(x)
    want = jax.pmap(train_call(nn.BatchNorm, "i"), axis_name="i")(x)
    one_batch = train_call(channels.BatchNorm, None)(x.reshape(-1, 4, 4, 3))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0].reshape(-1, 4, 4, 3), one_batch[0], atol=1e-5)
    stats = one_batch[1]["batch_stats"]
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            got[1]["batch_stats"][name][0], stats[name], atol=1e-6
        )
