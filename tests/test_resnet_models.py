"""Tests of the ResNet generator and discriminator (sngan_jax.models.resnet).

Shapes and value ranges at 32, 48 and 128 px, parameter counts against the
paper's layer lists, the discriminator's spectral state, every normalization
baseline, class conditioning, and batch statistics across devices.

Random initializers are slow to compile on a CPU (15-20 s for each 128 px
network, seconds for each smaller one), so most tests take the variables'
shapes from the model's own ``init`` (traced by ``jax.eval_shape``, which
builds every layer) and draw the values with numpy; the test of the
discriminator's spectral state runs the real ``init``.

The cross-device test needs several devices; on a CPU run with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sngan_jax import norms
from sngan_jax.models.resnet import ResNetDiscriminator, ResNetGenerator

BATCH = 2
Z_DIM = 128
IMAGENET_CLASSES = 1000


def _inputs(image_size: int, num_classes: int):
    """A batch of ``z``, images and labels (None when unconditional)."""
    rng = np.random.default_rng(image_size)
    z = jnp.asarray(rng.standard_normal((BATCH, Z_DIM), dtype=np.float32))
    images = rng.uniform(-1, 1, (BATCH, image_size, image_size, 3))
    labels = jnp.array([3, 7]) if num_classes else None
    return z, jnp.asarray(images, jnp.float32), labels


def _host_init(model: nn.Module, *args, seed: int = 0):
    """Variables of ``model.init`` with the right shapes, drawn on the host.

    Weights are normal with standard deviation 0.05; a spectral ``u`` is a unit
    vector, as the power iteration expects.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)

    def draw(path, shape):
        value = 0.05 * rng.standard_normal(shape.shape, dtype=np.float32)
        if path[-1] == "u":
            value /= np.linalg.norm(value)
        if path[-1] in ("var", "sigma"):
            value = np.ones(shape.shape, np.float32)
        return jnp.asarray(value)

    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict({k: draw(k, s) for k, s in flat.items()})


def _count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


# Forward passes.


@pytest.mark.parametrize("image_size", [32, 48])
def test_unconditional_forward(image_size):
    z, images, _ = _inputs(image_size, 0)
    g = ResNetGenerator(image_size)
    g_vars = _host_init(g, z)
    assert set(g_vars) == {"params", "batch_stats"}
    g_apply = jax.jit(g.apply, static_argnames=("train", "mutable"))
    fakes, _ = g_apply(g_vars, z, mutable=("batch_stats",))
    eval_fakes = g_apply(g_vars, z, train=False)
    for out in (fakes, eval_fakes):
        assert out.shape == (BATCH, image_size, image_size, 3)
        assert out.dtype == jnp.float32
        assert jnp.all(jnp.abs(out) <= 1.0)
    assert float(jnp.std(fakes)) > 1e-3  # not a constant image

    d = ResNetDiscriminator(image_size)
    d_vars = _host_init(d, images)
    assert set(d_vars) == {"params", "spectral"}
    d_apply = jax.jit(d.apply, static_argnames=("update_stats", "mutable"))
    logits, _ = d_apply(d_vars, jnp.concatenate([images, fakes]), mutable=("spectral",))
    assert logits.shape == (2 * BATCH,)
    assert logits.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(logits))


def test_conditional_generator_128():
    z, _, labels = _inputs(128, IMAGENET_CLASSES)
    g = ResNetGenerator(128, num_classes=IMAGENET_CLASSES)
    g_vars = _host_init(g, z, labels)
    apply = jax.jit(g.apply, static_argnames=("train", "mutable"))
    fakes, new_stats = apply(g_vars, z, labels, mutable=("batch_stats",))
    assert fakes.shape == (BATCH, 128, 128, 3)
    assert fakes.dtype == jnp.float32
    assert jnp.all(jnp.abs(fakes) <= 1.0)
    assert float(jnp.std(fakes)) > 1e-3
    # A mean and a variance for the two norms of each of the five blocks, and
    # for the final plain norm.
    assert len(jax.tree_util.tree_leaves(new_stats)) == 2 * (5 * 2 + 1)


@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_conditional_discriminator_128(conditioning):
    _, images, labels = _inputs(128, IMAGENET_CLASSES)
    d = ResNetDiscriminator(
        128, num_classes=IMAGENET_CLASSES, conditioning=conditioning
    )
    d_vars = _host_init(d, images, labels)
    apply = jax.jit(d.apply, static_argnames=("update_stats", "mutable"))
    logits, _ = apply(d_vars, images, labels, update_stats=True, mutable=("spectral",))
    assert logits.shape == (BATCH,)
    assert logits.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(logits))

    # The class must reach the logit: other labels, other logits.
    other, _ = apply(
        d_vars, images, labels + 1, update_stats=True, mutable=("spectral",)
    )
    assert not np.allclose(logits, other)


# Parameter counts of the paper's networks (ch = 64), summed by hand from the
# layer lists of appendix B. A k x k convolution has k*k*c_in*c_out weights and
# c_out biases; a dense layer n_in*n_out + n_out; a batch norm a scale and an
# offset per channel; a conditional batch norm a scale and an offset per
# channel and class (and none of its own).


def _conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def _dense(n_in, n_out):
    return n_in * n_out + n_out


def _bn(c, classes=0):
    return 2 * c * classes if classes else 2 * c


def _g_block(c_in, c_out, classes=0):
    """BN, ReLU, up, conv3x3, BN, ReLU, conv3x3; 1x1 conv on the upsampled input."""
    return (
        _bn(c_in, classes)
        + _conv(3, c_in, c_out)
        + _bn(c_out, classes)
        + _conv(3, c_out, c_out)
        + _conv(1, c_in, c_out)
    )


def _d_first_block(c_out):
    """conv3x3, ReLU, conv3x3, pool; 1x1 conv on the pooled image."""
    return _conv(3, 3, c_out) + _conv(3, c_out, c_out) + _conv(1, 3, c_out)


def _d_block(c_in, c_out, shortcut=True):
    """ReLU, conv3x3 (c_in wide), ReLU, conv3x3; a 1x1 conv where shapes change."""
    return (
        _conv(3, c_in, c_in)
        + _conv(3, c_in, c_out)
        + (_conv(1, c_in, c_out) if shortcut else 0)
    )


PAPER_COUNTS = {
    # 4x4x256, three up-blocks at 256, BN, conv3x3 to RGB.
    "g32": (
        _dense(Z_DIM, 4 * 4 * 256)
        + 3 * _g_block(256, 256)
        + _bn(256)
        + _conv(3, 256, 3),
        4_276_739,
    ),
    # 128 (down), 128 (down; 1x1 shortcut), 128, 128 (identity shortcuts).
    "d32": (
        _d_first_block(128)
        + _d_block(128, 128)
        + 2 * _d_block(128, 128, shortcut=False)
        + _dense(128, 1),
        1_053_825,
    ),
    "g48": (
        _dense(Z_DIM, 6 * 6 * 512)
        + _g_block(512, 256)
        + _g_block(256, 128)
        + _g_block(128, 64)
        + _bn(64)
        + _conv(3, 64, 3),
        4_878_083,
    ),
    "d48": (
        _d_first_block(64)
        + _d_block(64, 128)
        + _d_block(128, 256)
        + _d_block(256, 512)
        + _d_block(512, 1024)
        + _dense(1024, 1),
        10_141_441,
    ),
    "g128": (
        _dense(Z_DIM, 4 * 4 * 1024)
        + _g_block(1024, 1024, IMAGENET_CLASSES)
        + _g_block(1024, 512, IMAGENET_CLASSES)
        + _g_block(512, 256, IMAGENET_CLASSES)
        + _g_block(256, 128, IMAGENET_CLASSES)
        + _g_block(128, 64, IMAGENET_CLASSES)
        + _bn(64)
        + _conv(3, 64, 3),
        41_996_931,
    ),
    # ... + the projection's class embedding, 1000 x 1024.
    "d128_projection": (
        _d_first_block(64)
        + _d_block(64, 128)
        + _d_block(128, 256)
        + _d_block(256, 512)
        + _d_block(512, 1024)
        + _d_block(1024, 1024, shortcut=False)
        + _dense(1024, 1)
        + IMAGENET_CLASSES * 1024,
        30_041_857,
    ),
    # A 128-d class embedding joins the 256 channels after the third block.
    "d128_concat": (
        _d_first_block(64)
        + _d_block(64, 128)
        + _d_block(128, 256)
        + IMAGENET_CLASSES * 128
        + _d_block(256 + 128, 512)
        + _d_block(512, 1024)
        + _d_block(1024, 1024, shortcut=False)
        + _dense(1024, 1),
        30_538_625,
    ),
}


# The networks counted above: (model, image size, number of classes).
COUNTED_MODELS = {
    "g32": (ResNetGenerator(32), 32, 0),
    "d32": (ResNetDiscriminator(32), 32, 0),
    "g48": (ResNetGenerator(48), 48, 0),
    "d48": (ResNetDiscriminator(48), 48, 0),
    "g128": (
        ResNetGenerator(128, num_classes=IMAGENET_CLASSES),
        128,
        IMAGENET_CLASSES,
    ),
    "d128_projection": (
        ResNetDiscriminator(128, num_classes=IMAGENET_CLASSES),
        128,
        IMAGENET_CLASSES,
    ),
    "d128_concat": (
        ResNetDiscriminator(128, num_classes=IMAGENET_CLASSES, conditioning="concat"),
        128,
        IMAGENET_CLASSES,
    ),
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_count_matches_paper(name):
    by_layers, stated = PAPER_COUNTS[name]
    assert by_layers == stated  # the hand sum and the number written above agree

    model, image_size, classes = COUNTED_MODELS[name]
    z, images, labels = _inputs(image_size, classes)
    inputs = z if isinstance(model, ResNetGenerator) else images
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs, labels)
    assert _count(shapes["params"]) == stated

    # Power-iteration state is no parameter: no optimizer may ever see it.
    param_names = {path[-1] for path in traverse_util.flatten_dict(shapes["params"])}
    assert not param_names & {"u", "sigma"}
    if name.startswith("d"):
        assert _count(shapes["spectral"]) > 0


# The discriminator's spectral state.


@pytest.fixture(scope="module")
def d32():
    _, images, _ = _inputs(32, 0)
    d = ResNetDiscriminator(32)
    return d, jax.jit(d.init)(jax.random.key(0), images), images


def test_frozen_discriminator_moves_no_state(d32):
    d, variables, images = d32
    first, state = d.apply(variables, images, update_stats=False, mutable=["spectral"])
    second = d.apply(variables, images, update_stats=False)  # spectral immutable
    assert jnp.array_equal(first, second)
    for old, new in zip(
        jax.tree_util.tree_leaves(variables["spectral"]),
        jax.tree_util.tree_leaves(state["spectral"]),
        strict=True,
    ):
        assert jnp.array_equal(old, new)

    # An update does move it: the comparison above could fail.
    _, updated = d.apply(variables, images, update_stats=True, mutable=["spectral"])
    assert not all(
        jnp.array_equal(old, new)
        for old, new in zip(
            jax.tree_util.tree_leaves(variables["spectral"]),
            jax.tree_util.tree_leaves(updated["spectral"]),
            strict=True,
        )
    )


# Extra parameters of each baseline over the spectral D at 32 px (4 blocks of
# 128 channels): weight norm has a scale per output unit of its 10 convolutions
# and of the dense layer; layer and batch norm a scale and an offset on the
# first convolution of each block only (the others feed a residual sum).
EXTRA_PARAMS_D32 = {
    "spectral": 0,
    "none": 0,
    "weight": 10 * 128 + 1,
    "layer": 4 * 2 * 128,
    "batch": 4 * 2 * 128,
}


@pytest.mark.parametrize("norm", norms.NORMS)
def test_every_normalization_builds_and_runs(norm):
    _, images, _ = _inputs(32, 0)
    d = ResNetDiscriminator(32, norm=norm)
    variables = _host_init(d, images)
    logits, _ = d.apply(variables, images, mutable=["spectral"])

    assert logits.shape == (BATCH,)
    assert jnp.all(jnp.isfinite(logits))
    expected = PAPER_COUNTS["d32"][1] + EXTRA_PARAMS_D32[norm]
    assert _count(variables["params"]) == expected
    assert ("spectral" in variables) == (norm == "spectral")


# Class conditioning.


def test_conditional_generator_depends_on_labels():
    z, _, _ = _inputs(32, 10)
    g = ResNetGenerator(32, num_classes=10)
    # Random class tables: fresh ones are all ones and zeros, the same for
    # every class, so they could not tell the classes apart.
    variables = _host_init(g, z, jnp.zeros((BATCH,), jnp.int32))

    same_z = jnp.repeat(z[:1], 3, axis=0)
    apply = jax.jit(partial(g.apply, train=False))
    images = apply(variables, same_z, jnp.array([2, 2, 5]))
    assert jnp.array_equal(images[0], images[1])
    assert float(jnp.max(jnp.abs(images[0] - images[2]))) > 1e-2


def test_invalid_settings_raise():
    z, images, _ = _inputs(32, 10)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\[32, 48, 128\]"):
        ResNetGenerator(64).init(key, z)
    with pytest.raises(ValueError, match=r"\[32, 48, 128\]"):
        ResNetDiscriminator(64).init(key, jnp.zeros((BATCH, 64, 64, 3)))
    with pytest.raises(ValueError, match="conditioning"):
        ResNetDiscriminator(32, num_classes=10, conditioning="add").init(key, images)
    with pytest.raises(ValueError, match="labels"):
        ResNetGenerator(32, num_classes=10).init(key, z)
    with pytest.raises(ValueError, match="labels"):
        ResNetDiscriminator(32, num_classes=10).init(key, images)
    with pytest.raises(ValueError, match="images"):
        ResNetDiscriminator(48).init(key, images)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 64\)"):
        ResNetGenerator(32, z_dim=64).init(key, z)


# Batch statistics across devices.


def test_batch_statistics_are_global_across_devices():
    """Under pmap, G and the batch-norm D see the global batch, not their share."""
    n = jax.local_device_count()
    if n < 2:
        pytest.skip("needs several devices (see XLA_FLAGS in the module docstring)")
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2 * n, Z_DIM), dtype=np.float32))
    labels = jnp.arange(2 * n) % 10

    def shard(x):
        return x.reshape(n, -1, *x.shape[1:])

    g = ResNetGenerator(32, ch=8, num_classes=10, axis_name="batch")
    g_local = g.clone(axis_name=None)
    variables = _host_init(g_local, z, labels)
    images, stats = jax.jit(partial(g_local.apply, mutable=["batch_stats"]))(
        variables, z, labels
    )
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), variables)
    images_n, stats_n = jax.pmap(
        lambda v, z, y: g.apply(v, z, y, mutable=["batch_stats"]), axis_name="batch"
    )(replicated, shard(z), shard(labels))
    np.testing.assert_allclose(images_n.reshape(images.shape), images, atol=1e-5)
    for one, many in zip(
        jax.tree_util.tree_leaves(stats),
        jax.tree_util.tree_leaves(stats_n),
        strict=True,
    ):
        np.testing.assert_allclose(many, jnp.stack([one] * n), rtol=1e-4, atol=1e-6)

    d = ResNetDiscriminator(32, ch=8, norm="batch", axis_name="batch")
    d_local = d.clone(axis_name=None)
    d_vars = _host_init(d_local, images)
    logits = jax.jit(d_local.apply)(d_vars, images)
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), d_vars)
    logits_n = jax.pmap(lambda v, x: d.apply(v, x), axis_name="batch")(
        replicated, shard(images)
    )
    np.testing.assert_allclose(logits_n.reshape(-1), logits, rtol=1e-4, atol=1e-4)
