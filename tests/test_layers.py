"""The linen layers: where their state lives, initialization, baselines."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sngan_jax import layers, norms, optim, phases, spectral

KEY = jax.random.PRNGKey(0)

SN_LAYERS = [
    (layers.SNDense(8), jnp.ones((2, 5))),
    (layers.SNConv(8, (3, 3)), jnp.ones((2, 6, 6, 3))),
    (layers.SNConvTranspose(8, (4, 4), (2, 2)), jnp.ones((2, 4, 4, 3))),
    (layers.SNEmbed(10, 8), jnp.array([1, 7])),
]


@pytest.mark.parametrize("layer,x", SN_LAYERS, ids=lambda p: type(p).__name__)
def test_vectors_live_in_the_spectral_collection(layer, x):
    variables = layer.init(KEY, x, update_stats=True)
    assert set(variables) == {"params", "spectral"}
    assert set(variables["spectral"]) == {"u", "sigma"}
    kernel = next(v for k, v in variables["params"].items() if k != "bias")
    assert variables["spectral"]["u"].shape == (kernel.shape[-1],)


@pytest.mark.parametrize("layer,x", SN_LAYERS, ids=lambda p: type(p).__name__)
def test_eval_call_changes_nothing(layer, x):
    variables = layer.init(KEY, x, update_stats=True)
    y1, new = layer.apply(variables, x, update_stats=False, mutable=["spectral"])
    y2 = layer.apply(variables, x, update_stats=False)
    assert np.array_equal(y1, y2)
    for a, b in zip(
        jax.tree.leaves(new), jax.tree.leaves(variables["spectral"]), strict=True
    ):
        assert np.array_equal(a, b)
    # A training call does move the vector.
    _, moved = layer.apply(variables, x, update_stats=True, mutable=["spectral"])
    assert not np.array_equal(moved["spectral"]["u"], variables["spectral"]["u"])


def test_initial_sigma_is_close_to_exact_after_warm_up():
    x = jnp.ones((1, 8, 8, 64))
    cold = layers.SNConv(64, n_init_steps=0).init(KEY, x, update_stats=True)
    warm = layers.SNConv(64, n_init_steps=15).init(KEY, x, update_stats=True)
    exact = float(spectral.exact_sigma(warm["params"]["kernel"]))
    cold_sigma = spectral.spectral_normalize(
        cold["params"]["kernel"], cold["spectral"]["u"], update=False
    )[2]
    err_cold = abs(float(cold_sigma) - exact) / exact
    err_warm = abs(float(warm["spectral"]["sigma"]) - exact) / exact
    assert err_warm < 0.05, err_warm
    assert err_warm < err_cold


def test_the_normalized_layer_uses_the_normalized_kernel():
    layer = layers.SNDense(4, use_bias=False, n_init_steps=500)
    x = jax.random.normal(KEY, (3, 6))
    variables = layer.init(KEY, x, update_stats=True)
    kernel = variables["params"]["kernel"]
    y = layer.apply(variables, x, update_stats=False)
    np.testing.assert_allclose(y, x @ kernel / spectral.exact_sigma(kernel), rtol=1e-4)


def test_weight_norm_starts_as_the_plain_layer():
    x = jax.random.normal(KEY, (3, 6))
    wn = norms.WNDense(4)
    variables = wn.init(KEY, x)
    plain = x @ variables["params"]["kernel"]
    np.testing.assert_allclose(wn.apply(variables, x), plain, rtol=1e-5, atol=1e-6)


class TinyD(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x, update_stats=True):
        x = nn.relu(norms.make_conv(self.norm, 4)(x, update_stats))
        x = x.reshape(x.shape[0], -1)
        return norms.make_dense(self.norm, 1, normalize_output=False)(x, update_stats)


@pytest.mark.parametrize("norm", norms.NORMS)
def test_every_baseline_normalization_builds_and_runs(norm):
    x = jax.random.normal(KEY, (4, 6, 6, 3))
    variables = TinyD(norm).init(KEY, x)
    y = TinyD(norm).apply(variables, x, mutable=["spectral"])[0]
    assert y.shape == (4, 1)
    assert ("spectral" in variables) == (norm == "spectral")


def test_unknown_norm_is_rejected_with_choices():
    with pytest.raises(ValueError, match="choose one of"):
        TinyD("group").init(KEY, jnp.ones((1, 6, 6, 3)))


def test_batch_stat_norm_normalizes_each_channel():
    x = 3.0 + 2.0 * jax.random.normal(KEY, (64, 4, 4, 5))
    bn = norms.BatchStatNorm()
    y = bn.apply(bn.init(KEY, x), x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_conditional_batch_norm_depends_on_the_label():
    cbn = layers.ConditionalBatchNorm(num_classes=3)
    x = jax.random.normal(KEY, (4, 2, 2, 6))
    labels = jnp.array([0, 1, 2, 0])
    variables = cbn.init(KEY, x, labels, train=True)
    params = jax.tree.map(
        lambda p: p + jnp.arange(p.shape[0])[:, None], variables["params"]
    )
    variables = {**variables, "params": params}
    y, _ = cbn.apply(variables, x, labels, train=True, mutable=["batch_stats"])
    y_other, _ = cbn.apply(
        variables, x, labels[::-1], train=True, mutable=["batch_stats"]
    )
    assert y.shape == x.shape
    assert not np.allclose(y, y_other)


def test_weight_clipping_keeps_parameters_in_bounds():
    params = {"w": jnp.array([0.005, -0.009, 0.0])}
    tx = optax.chain(optax.sgd(1.0), optim.clip_weights(0.01))
    state = tx.init(params)
    grads = {"w": jnp.array([-1.0, 1.0, 0.004])}
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], [0.01, -0.01, -0.004], atol=1e-7)


def test_spectral_sigmas_flattens_layer_paths():
    tree = {
        "SNConv_0": {"u": jnp.ones(2), "sigma": 1.5},
        "b": {"SNDense_0": {"sigma": 2.0}},
    }
    assert layers.spectral_sigmas(tree) == {"SNConv_0": 1.5, "b/SNDense_0": 2.0}


# (kernel, strides, input height and width): the generator's 4x4 stride-2
# layers, and shapes that exercise every phase rule (odd kernels, kernels
# that are not a multiple of the stride, stride 1 and 3, odd inputs).
CONV_TRANSPOSE_CASES = [
    ((4, 4), (2, 2), (4, 4)),
    ((4, 4), (2, 2), (5, 3)),
    ((3, 3), (2, 2), (4, 4)),
    ((5, 3), (2, 2), (3, 4)),
    ((2, 2), (2, 2), (3, 3)),
    ((3, 3), (1, 1), (5, 5)),
    ((4, 4), (3, 3), (3, 2)),
    ((2, 2), (3, 3), (3, 3)),  # stride above the kernel: the fallback
]


@pytest.mark.parametrize("kernel_size,strides,hw", CONV_TRANSPOSE_CASES)
def test_phase_conv_transpose_equals_flax_conv_transpose(kernel_size, strides, hw):
    """Same kernel, same outputs and gradients (input, kernel, bias) as flax's."""
    flax_layer = nn.ConvTranspose(5, kernel_size, strides, padding="SAME")
    ours = layers.ConvTranspose(5, kernel_size, strides)

    def loss(layer, params, x, weights):
        return jnp.sum(weights * jnp.tanh(layer.apply({"params": params}, x)))

    # In float64, so that a tolerance of 1e-12 tells a different function from
    # a different order of float rounding.
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, *hw, 3), jnp.float64)
        params = flax_layer.init(KEY, x)["params"]
        params["bias"] = jax.random.normal(jax.random.fold_in(KEY, 1), (5,))
        assert jax.tree.map(jnp.shape, ours.init(KEY, x)["params"]) == (
            jax.tree.map(jnp.shape, params)
        )
        want = flax_layer.apply({"params": params}, x)
        got = ours.apply({"params": params}, x)
        # A loss that weights every output differently, so that a pixel
        # written to the wrong place changes the gradients.
        weights = jax.random.normal(jax.random.fold_in(KEY, 2), want.shape)
        grad = jax.grad(loss, argnums=(1, 2))
        want_grads = grad(flax_layer, params, x, weights)
        got_grads = grad(ours, params, x, weights)
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_phase_conv_transpose_in_float32_and_under_jit():
    x = jax.random.normal(KEY, (4, 8, 8, 16))
    kernel = jax.random.normal(KEY, (4, 4, 16, 8)) / 8
    dn = ("NHWC", "HWIO", "NHWC")
    want = jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=dn)
    got = jax.jit(phases.conv_transpose, static_argnums=2)(x, kernel, (2, 2))
    assert got.dtype == jnp.float32 and got.shape == (4, 16, 16, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


STRIDED_CONV_CASES = [
    ((4, 4), (2, 2), (8, 8), ((1, 1), (1, 1))),  # SNDCGAN's downsampling layers
    ((4, 4), (2, 2), (6, 10), "SAME"),
    ((6, 6), (3, 3), (12, 9), ((0, 0), (0, 0))),
    ((4, 2), (2, 2), (6, 8), ((1, 1), (0, 0))),
    ((3, 3), (2, 2), (8, 8), ((1, 1), (1, 1))),  # stride does not divide: direct
]


@pytest.mark.parametrize("kernel_size,strides,hw,padding", STRIDED_CONV_CASES)
def test_strided_conv_by_phases_equals_lax_conv(kernel_size, strides, hw, padding):
    """Outputs, gradients and the gradient penalty's second derivatives."""
    dn = ("NHWC", "HWIO", "NHWC")

    def lax_conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=dn
        )

    def ours(x, kernel):
        return phases.conv(x, kernel, strides, padding)

    def loss(conv, x, kernel, weights):
        return jnp.sum(weights * jnp.tanh(conv(x, kernel)))

    def penalty(conv, x, kernel, weights):
        grad_x = jax.grad(loss, argnums=1)(conv, x, kernel, weights)
        return jnp.sum(jnp.square(grad_x))

    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, *hw, 3), jnp.float64)
        kernel = jax.random.normal(jax.random.fold_in(KEY, 1), (*kernel_size, 3, 4))
        want = lax_conv(x, kernel)
        weights = jax.random.normal(jax.random.fold_in(KEY, 2), want.shape)
        got = ours(x, kernel)
        results = []
        for fn in (loss, penalty):
            grad = jax.jit(jax.grad(fn, argnums=(1, 2)), static_argnums=0)
            results.append(
                (grad(ours, x, kernel, weights), grad(lax_conv, x, kernel, weights))
            )
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for got_grads, want_grads in results:
        for a, b in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


class StridedConv(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
        conv = norms.make_conv(self.norm, 4, (4, 4), (2, 2))
        return conv(x, False)


@pytest.mark.parametrize("norm", ["none", "layer", "spectral"])
def test_discriminator_convolutions_take_the_phase_path(norm, monkeypatch):
    # Every normalization's convolutions go through phases.conv, so that the
    # baselines differ from spectral normalization in normalization only.
    calls = []
    phase_conv = phases.conv

    def counting_conv(*args):
        calls.append(args[2])
        return phase_conv(*args)

    x = jax.random.normal(KEY, (2, 8, 8, 3))
    module = StridedConv(norm)
    variables = module.init(KEY, x)
    want = module.apply(variables, x)
    monkeypatch.setattr(phases, "conv", counting_conv)
    np.testing.assert_allclose(module.apply(variables, x), want)
    assert calls == [(2, 2)]
