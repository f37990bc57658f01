"""The standard CNN and the small networks: shapes and the paper's sizes.

The ResNets are tested in test_resnet_models.py.
"""

import jax
import jax.numpy as jnp
import pytest

from sngan_jax import layers, models, spectral
from sngan_jax.models import dcgan, small
from sngan_jax.train import param_count

KEY = jax.random.PRNGKey(0)


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def bn(c):
    return 2 * c


# Paper, appendix B, Table 3 (M = 32: bottom 4x4; M = 48: bottom 6x6).
def sndcgan_d_count(bottom):
    convs = (
        conv(3, 3, 64)
        + conv(4, 64, 64)
        + conv(3, 64, 128)
        + conv(4, 128, 128)
        + conv(3, 128, 256)
        + conv(4, 256, 256)
        + conv(3, 256, 512)
    )
    return convs + bottom * bottom * 512 + 1


def sndcgan_g_count(bottom):
    dense = 128 * bottom * bottom * 512 + bottom * bottom * 512
    return (
        dense
        + bn(bottom * bottom * 512)  # batch norm after the dense layer
        + conv(4, 512, 256)
        + bn(256)
        + conv(4, 256, 128)
        + bn(128)
        + conv(4, 128, 64)
        + bn(64)
        + conv(3, 64, 3)
    )


# The same sums, evaluated: (size, G params, D params).
SNDCGAN_COUNTS = [(32, 3_828_739, 2_935_873), (48, 5_170_179, 2_946_113)]


@pytest.mark.parametrize("size,g_count,d_count", SNDCGAN_COUNTS)
def test_sndcgan_sizes_and_shapes(size, g_count, d_count):
    bottom = size // 8
    g = dcgan.DCGANGenerator(size)
    d = dcgan.DCGANDiscriminator(size)
    z = jnp.zeros((2, 128))
    g_vars = jax.eval_shape(lambda: g.init(KEY, z, train=False))
    d_vars = jax.eval_shape(lambda: d.init(KEY, jnp.zeros((2, size, size, 3))))
    assert sndcgan_g_count(bottom) == g_count
    assert sndcgan_d_count(bottom) == d_count
    assert param_count(g_vars["params"]) == g_count
    assert param_count(d_vars["params"]) == d_count
    images = g.apply(g.init(KEY, z, train=False), z, train=False)
    assert images.shape == (2, size, size, 3)
    assert float(jnp.max(jnp.abs(images))) <= 1.0


def test_sndcgan_d_runs_forward_at_its_resolution():
    d = dcgan.DCGANDiscriminator(32, ch=16)
    x = jax.random.normal(KEY, (3, 32, 32, 3))
    variables = d.init(KEY, x)
    assert d.apply(variables, x, update_stats=False).shape == (3,)


def test_sndcgan_rejects_other_sizes():
    with pytest.raises(ValueError, match="image sizes"):
        dcgan.DCGANGenerator(64).init(KEY, jnp.zeros((1, 128)), train=False)


@pytest.mark.parametrize("size", [8, 16])
def test_small_image_pair(size):
    g = small.SmallGenerator(size, ch=8, channels=1)
    d = small.SmallDiscriminator(size, ch=8)
    z = jax.random.normal(KEY, (4, 32))
    g_vars = g.init(KEY, z, train=False)
    images = g.apply(g_vars, z, train=False)
    assert images.shape == (4, size, size, 1)
    d_vars = d.init(KEY, images)
    assert d.apply(d_vars, images, update_stats=False).shape == (4,)


def test_mlp_pair():
    g, d = small.MLPGenerator(hidden=16), small.MLPDiscriminator(hidden=16)
    z = jax.random.normal(KEY, (5, 4))
    points = g.apply(g.init(KEY, z), z)
    assert points.shape == (5, 2)
    logits = d.apply(d.init(KEY, points), points, update_stats=False)
    assert logits.shape == (5,)


def test_build_picks_models_by_name():
    from configs import common

    model = common.base().model
    for name, g_type in [
        ("sndcgan", dcgan.DCGANGenerator),
        ("mlp", small.MLPGenerator),
    ]:
        model.name = name
        g, d = models.build(model)
        assert isinstance(g, g_type)
    model.name = "vit"
    with pytest.raises(ValueError, match="choose one of"):
        models.build(model)


def test_sndcgan_sigma_at_step_0_after_warm_up(capsys):
    """Reports sigma against the SVD value for each layer of the paper's D."""
    d = dcgan.DCGANDiscriminator(32)  # sn_init_steps=15
    variables = jax.jit(d.init)(KEY, jnp.zeros((1, 32, 32, 3)))
    rows = []
    for name, sigma in layers.spectral_sigmas(variables["spectral"]).items():
        kernel = variables["params"][name]["kernel"]
        exact = float(spectral.exact_sigma(kernel))
        # What a random vector without warm-up would give, for comparison.
        u0 = jax.random.normal(jax.random.PRNGKey(1), kernel.shape[-1:])
        cold = float(spectral.spectral_normalize(kernel, u0, update=False)[2])
        cold = cold / float(jnp.linalg.norm(u0))
        rows.append(
            (name, abs(float(sigma) - exact) / exact, abs(cold - exact) / exact)
        )
    with capsys.disabled():
        print("\nSNDCGAN D, sigma at step 0: relative error after 15 / 0 iterations")
        for name, warm, cold in rows:
            print(f"  {name:10s} {warm:8.4f} {cold:8.4f}")
    assert len(rows) == 8
    assert max(warm for _, warm, _ in rows) < 0.05
    assert max(warm for _, warm, _ in rows) < 0.25 * max(cold for _, _, cold in rows)
