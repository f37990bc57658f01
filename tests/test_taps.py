"""Thin stride-1 convolutions as matrix products over the kernel's taps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_sndcgan
from sngan_jax import phases, taps, train

KEY = jax.random.PRNGKey(0)
NHWC = ("NHWC", "HWIO", "NHWC")

# (input channels, output channels, kernel size, input size, padding)
CASES = [
    (3, 64, (3, 3), (8, 8), ((1, 1), (1, 1))),  # a discriminator's first layer
    (64, 3, (3, 3), (8, 8), ((1, 1), (1, 1))),  # a generator's last layer
    (2, 20, (3, 3), (7, 6), ((0, 2), (1, 0))),
    (40, 2, (4, 4), (7, 6), ((1, 2), (2, 1))),
    (3, 8, (1, 1), (5, 5), ((0, 0), (0, 0))),
    (1, 12, (3, 2), (6, 5), ((2, 0), (0, 1))),
    (30, 1, (5, 3), (9, 4), ((2, 2), (1, 1))),
]


def lax_conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=NHWC
    )


@pytest.mark.parametrize("c_in,c_out,kernel_size,hw,padding", CASES)
def test_taps_equal_lax_conv_to_second_order(c_in, c_out, kernel_size, hw, padding):
    """Outputs, gradients, and gradients of a function of the gradients."""

    def loss(conv, x, kernel, weights):
        return jnp.sum(weights * jnp.tanh(conv(x, kernel, padding)))

    def of_gradients(conv, x, kernel, weights):
        grads = jax.grad(loss, argnums=(1, 2))(conv, x, kernel, weights)
        return sum(jnp.sum(jnp.sin(g)) for g in grads)

    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, *hw, c_in), jnp.float64)
        kernel = jax.random.normal(
            jax.random.fold_in(KEY, 1), (*kernel_size, c_in, c_out), jnp.float64
        )
        want = lax_conv(x, kernel, padding)
        weights = jax.random.normal(jax.random.fold_in(KEY, 2), want.shape)
        got = taps.conv(x, kernel, padding)
        results = []
        for fn in (loss, of_gradients):
            grad = jax.jit(jax.grad(fn, argnums=(1, 2)), static_argnums=0)
            results.append(
                (
                    grad(taps.conv, x, kernel, weights),
                    grad(lax_conv, x, kernel, weights),
                )
            )
    assert taps.form(x.shape, kernel.shape, padding) == (
        "inputs" if c_in < c_out else "outputs"
    )
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for got_grads, want_grads in results:
        for a, b in zip(got_grads, want_grads, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "x_shape,kernel_shape,padding",
    [
        ((2, 8, 8, 64), (3, 3, 64, 64), ((1, 1), (1, 1))),  # no thin side
        ((2, 8, 8, 8), (3, 3, 8, 64), ((1, 1), (1, 1))),  # 72 columns > 64
        ((2, 8, 8, 3), (3, 3, 3, 64), ((3, 0), (1, 1))),  # padding beyond k - 1
        ((2, 8, 8, 3), (3, 3, 3, 64), ((-1, 1), (1, 1))),  # negative padding
        ((2, 8, 3), (3, 3, 64), ((1, 1),)),  # not 2-D
    ],
)
def test_layers_taps_do_not_apply_to_are_refused(x_shape, kernel_shape, padding):
    assert taps.form(x_shape, kernel_shape, padding) is None
    with pytest.raises(ValueError, match="jax.lax.conv_general_dilated"):
        taps.conv(jnp.zeros(x_shape), jnp.zeros(kernel_shape), padding)


@pytest.mark.parametrize("c_in,c_out", [(3, 64), (64, 3)])
def test_phases_conv_takes_taps_for_thin_layers_on_the_cpu(
    c_in, c_out, jaxpr_operations
):
    def primitives(fn, *args):
        return {name for name, _ in jaxpr_operations(fn, *args)}

    assert jax.default_backend() == "cpu"
    x = jax.random.normal(KEY, (2, 8, 8, c_in))
    kernel = jax.random.normal(KEY, (3, 3, c_in, c_out))

    def loss(x, kernel):
        return jnp.sum(jnp.sin(phases.conv(x, kernel, (1, 1), "SAME")))

    both = jax.value_and_grad(loss, argnums=(0, 1))
    assert "conv_general_dilated" not in primitives(both, x, kernel)
    # A layer with no thin side stays a convolution.
    wide = jax.random.normal(KEY, (3, 3, c_in, c_in))
    assert "conv_general_dilated" in primitives(both, x, wide)
    # Same values as the convolution, in float32.
    np.testing.assert_allclose(
        phases.conv(x, kernel, (1, 1), "SAME"),
        lax_conv(x, kernel, ((1, 1), (1, 1))),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    x = jax.random.normal(KEY, (2, 8, 8, 64))
    kernel = 0.1 * jax.random.normal(KEY, (3, 3, 64, 3))
    padding = ((1, 1), (1, 1))
    want = lax_conv(x, kernel, padding)
    got = taps.conv(x.astype(jnp.bfloat16), kernel, padding)
    dx, dk = jax.grad(
        lambda x, k: jnp.sum(taps.conv(x, k, padding).astype(jnp.float32)),
        argnums=(0, 1),
    )(x.astype(jnp.bfloat16), kernel)
    assert got.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    assert dk.dtype == jnp.float32
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


def test_sndcgan_generator_keeps_its_variables_and_function():
    """The last layer is flax's Conv still (names, shapes), computed by taps."""
    config = cifar10_sndcgan.get_config()
    config.model.ch = 8
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    assert state.g_params["Conv_0"]["kernel"].shape == (3, 3, 8, 3)
    assert state.g_params["Conv_0"]["bias"].shape == (3,)
    z = jax.random.normal(KEY, (4, config.model.z_dim))
    images = trainer.sample(state.g_params, state.g_batch_stats, z)
    # The same generator with the last layer as a plain convolution.
    variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}
    features = _features_before_last_conv(trainer, variables, z)
    conv = state.g_params["Conv_0"]
    want = jnp.tanh(lax_conv(features, conv["kernel"], ((1, 1), (1, 1))) + conv["bias"])
    np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)


def _features_before_last_conv(trainer, variables, z):
    """The input of the generator's last convolution, as flax intercepts it."""
    seen = []

    def keep_input(next_fun, args, kwargs, context):
        if context.module.name == "Conv_0" and context.method_name == "__call__":
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(keep_input):
        trainer.g_local.apply(variables, z, None, train=False)
    return seen[0]
