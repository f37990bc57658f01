"""The paper's ResNet generator and discriminator (appendix B) for 32, 48, 128 px.

Generator: a dense layer to a ``bottom x bottom`` grid, then residual up-blocks
that each double H and W (batch norm, ReLU, nearest-neighbour upsampling, two
3x3 convolutions, and a 1x1 convolution on the upsampled shortcut), then batch
norm, ReLU, a 3x3 convolution to RGB and tanh. Class-conditional generators
replace the batch norm inside the blocks by conditional batch norm.

Discriminator: an "optimized" first block on the image (3x3 convolution, ReLU,
3x3 convolution, average pooling, with a pooled 1x1 shortcut), residual
down-blocks (ReLU, 3x3 convolution, ReLU, 3x3 convolution, optional 2x2 average
pooling; 1x1 shortcut where the shape changes), ReLU, a sum over H and W and a
dense layer to one logit. Class-conditional discriminators either add the
projection term ``<embed(y), h>`` to the logit (Miyato and Koyama, "cGANs with
Projection Discriminator", 2018) or concatenate a class embedding to the
feature maps after the third block (the SN-GAN paper's ImageNet model).

``ch = 64`` gives the paper's widths. Every discriminator layer is built by
``norms.make_conv`` / ``norms.make_dense``, so the same network runs with any
of the normalizations that the paper compares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import channels, layers, norms
from sngan_jax.models.common import BN_MOMENTUM, by_image_size, to_image

Array = jax.Array

CONDITIONINGS = ("projection", "concat")

# The 3x3 convolutions of a residual branch follow a ReLU, so they start with
# twice the Glorot variance (gain sqrt(2)); shortcuts, dense layers and the
# generator's output convolution use plain Glorot, as the reference code does.
_residual_init = nn.initializers.variance_scaling(2.0, "fan_avg", "uniform")
_plain_init = nn.initializers.xavier_uniform()


class _GSpec(NamedTuple):
    bottom: int  # H = W of the dense layer's output
    widths: tuple[int, ...]  # dense output, then each up-block's; units of ch


class _DSpec(NamedTuple):
    first: int  # width of the optimized first block (which halves H, W); units of ch
    blocks: tuple[tuple[int, bool], ...]  # (width in units of ch, halves H and W)


_G_SPECS = {
    32: _GSpec(4, (4, 4, 4, 4)),
    48: _GSpec(6, (8, 4, 2, 1)),
    128: _GSpec(4, (16, 16, 8, 4, 2, 1)),
}
_D_SPECS = {
    32: _DSpec(2, ((2, True), (2, False), (2, False))),
    48: _DSpec(1, ((2, True), (4, True), (8, True), (16, False))),
    128: _DSpec(1, ((2, True), (4, True), (8, True), (16, True), (16, False))),
}

# The concat discriminator joins a class embedding of this many channels to the
# feature maps that leave this many blocks (16x16x256 at 128 px).
_CONCAT_AFTER_BLOCKS = 3
_CONCAT_FEATURES = 128


def _check_labels(num_classes: int, labels: Array | None, network: str) -> None:
    if num_classes > 0 and labels is None:
        raise ValueError(
            f"this {network} is class-conditional (num_classes={num_classes}) and "
            f"needs integer labels of shape (N,); got labels=None"
        )


def _upsample(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling of ``(N, H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x: Array) -> Array:
    """2x2 average pooling of ``(N, H, W, C)``."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _batch_norm(
    num_classes: int, axis_name: str | None, name: str, dtype: Any
) -> Callable[[Array, Array | None, bool], Array]:
    """The generator's batch norm, class-conditional when ``num_classes > 0``.

    Call it inside a compact method; the result is ``f(x, labels, train)``.
    """
    if num_classes > 0:
        return layers.ConditionalBatchNorm(
            num_classes,
            axis_name=axis_name,
            momentum=BN_MOMENTUM,
            dtype=dtype,
            name=name,
        )

    def norm(x: Array, labels: Array | None, train: bool) -> Array:
        bn = channels.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            axis_name=axis_name,
            dtype=dtype,
            name=name,
        )
        return bn(x)

    return norm


class GeneratorBlock(nn.Module):
    """Residual up-block: ``(N, H, W, C)`` to ``(N, 2H, 2W, features)``."""

    features: int
    num_classes: int = 0
    axis_name: str | None = None
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(self, x: Array, labels: Array | None, train: bool) -> Array:
        def bn_relu(h: Array, name: str) -> Array:
            bn = _batch_norm(self.num_classes, self.axis_name, name, self.dtype)
            return nn.relu(bn(h, labels, train))

        def conv(
            features: int, size: int, init: layers.Initializer, name: str
        ) -> nn.Conv:
            return nn.Conv(
                features, (size, size), kernel_init=init, dtype=self.dtype, name=name
            )

        h = _upsample(bn_relu(x, "bn1"))
        h = conv(self.features, 3, _residual_init, "conv1")(h)
        h = conv(self.features, 3, _residual_init, "conv2")(bn_relu(h, "bn2"))

        shortcut = conv(self.features, 1, _plain_init, "shortcut")(_upsample(x))
        return h + shortcut


class ResNetGenerator(nn.Module):
    """Maps ``z (N, z_dim)`` (and ``labels (N,)``) to images ``(N, S, S, 3)``.

    Images lie in [-1, 1]. ``labels`` are integer classes in
    ``[0, num_classes)``, required when ``num_classes > 0`` and ignored
    otherwise. ``train`` selects batch statistics (and updates the running
    averages in ``"batch_stats"``, which must then be mutable) over the running
    averages.
    """

    image_size: int
    ch: int = 64
    z_dim: int = 128
    num_classes: int = 0
    axis_name: str | None = None
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, z: Array, labels: Array | None = None, train: bool = True
    ) -> Array:
        spec = by_image_size(_G_SPECS, self.image_size, "ResNet generator")
        if z.ndim != 2 or z.shape[-1] != self.z_dim:
            raise ValueError(f"z must have shape (N, {self.z_dim}), got {z.shape}")
        _check_labels(self.num_classes, labels, "generator")

        width, dtype = spec.widths[0] * self.ch, self.dtype
        dense = nn.Dense(
            spec.bottom**2 * width, kernel_init=_plain_init, dtype=dtype, name="dense"
        )
        h = dense(z).reshape(z.shape[0], spec.bottom, spec.bottom, width)
        for i, mult in enumerate(spec.widths[1:], start=1):
            block = GeneratorBlock(
                mult * self.ch,
                self.num_classes,
                self.axis_name,
                dtype=dtype,
                name=f"block{i}",
            )
            h = block(h, labels, train)

        # The last batch norm is unconditional, as in the reference code.
        h = nn.relu(_batch_norm(0, self.axis_name, "bn", dtype)(h, None, train))
        conv = to_image(3, dtype, kernel_init=_plain_init, name="conv_out")
        return jnp.tanh(conv(h)).astype(jnp.float32)


class _DiscriminatorBlockBase(nn.Module):
    """Fields shared by the discriminator blocks, and their convolution factory."""

    features: int
    norm: str = "spectral"
    axis_name: str | None = None
    sn_init_steps: int = 15
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    def conv(
        self,
        features: int,
        size: int,
        init: layers.Initializer,
        *,
        normalize_output: bool,
    ) -> norms.LayerFn:
        # Layer and batch norm baselines normalize only the first convolution's
        # output; the others feed the residual sum.
        return norms.make_conv(
            self.norm,
            features,
            (size, size),
            normalize_output=normalize_output,
            axis_name=self.axis_name,
            kernel_init=init,
            sn_init_steps=self.sn_init_steps,
            dtype=self.dtype,
        )


class OptimizedDiscriminatorBlock(_DiscriminatorBlockBase):
    """First block, on the image: ``(N, H, W, C)`` to ``(N, H/2, W/2, features)``.

    It has no ReLU in front (the input is an image), and its shortcut pools
    before the 1x1 convolution, which is cheaper and equivalent.
    """

    @nn.compact
    def __call__(self, x: Array, update_stats: bool) -> Array:
        conv1 = self.conv(self.features, 3, _residual_init, normalize_output=True)
        conv2 = self.conv(self.features, 3, _residual_init, normalize_output=False)
        h = conv2(nn.relu(conv1(x, update_stats)), update_stats)
        h = _downsample(h)

        shortcut = self.conv(self.features, 1, _plain_init, normalize_output=False)
        return h + shortcut(_downsample(x), update_stats)


class DiscriminatorBlock(_DiscriminatorBlockBase):
    """Residual block: ``(N, H, W, C)`` to ``(N, H', W', features)``.

    ``H' = H / 2`` when ``downsample``, else ``H``. The hidden convolution keeps
    the input width ``C``. The shortcut is the identity when the shape does not
    change, and a 1x1 convolution (then pooling) when it does.
    """

    downsample: bool = False

    @nn.compact
    def __call__(self, x: Array, update_stats: bool) -> Array:
        hidden = x.shape[-1]
        conv1 = self.conv(hidden, 3, _residual_init, normalize_output=True)
        conv2 = self.conv(self.features, 3, _residual_init, normalize_output=False)
        h = conv1(nn.relu(x), update_stats)
        h = conv2(nn.relu(h), update_stats)
        if self.downsample:
            h = _downsample(h)

        if x.shape[-1] == self.features and not self.downsample:
            return h + x
        shortcut = self.conv(self.features, 1, _plain_init, normalize_output=False)
        shortcut = shortcut(x, update_stats)
        if self.downsample:
            shortcut = _downsample(shortcut)
        return h + shortcut


class ResNetDiscriminator(nn.Module):
    """Maps images ``(N, S, S, C)`` (and ``labels (N,)``) to logits ``(N,)``.

    ``labels`` are integer classes in ``[0, num_classes)``, required when
    ``num_classes > 0`` and ignored otherwise. ``conditioning`` picks the
    projection or the concat discriminator. ``update_stats`` is true only in a
    discriminator update: the spectrally normalized layers then run one power
    iteration (written back when ``"spectral"`` is mutable).
    """

    image_size: int
    ch: int = 64
    num_classes: int = 0
    conditioning: str = "projection"
    norm: str = "spectral"
    axis_name: str | None = None
    sn_init_steps: int = 15
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, x: Array, labels: Array | None = None, update_stats: bool = True
    ) -> Array:
        spec = self._check(x, labels)
        conditioning = self.conditioning if self.num_classes > 0 else None
        opts = {
            "norm": self.norm,
            "axis_name": self.axis_name,
            "sn_init_steps": self.sn_init_steps,
            "dtype": self.dtype,
        }
        x = x.astype(self.dtype)

        first = OptimizedDiscriminatorBlock(spec.first * self.ch, **opts, name="block1")
        h = first(x, update_stats)
        for i, (mult, down) in enumerate(spec.blocks, start=2):
            if conditioning == "concat" and i == _CONCAT_AFTER_BLOCKS + 1:
                h = self._concat_labels(h, labels)
            block = DiscriminatorBlock(
                mult * self.ch, **opts, downsample=down, name=f"block{i}"
            )
            h = block(h, update_stats)

        # The sum over H and W, and the logits, in float32.
        h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
        out = norms.make_dense(
            self.norm,
            1,
            normalize_output=False,
            axis_name=self.axis_name,
            kernel_init=_plain_init,
            sn_init_steps=self.sn_init_steps,
            dtype=jnp.float32,
        )
        logits = out(h, update_stats)[:, 0]
        if conditioning == "projection":
            logits = logits + self._projection(h, labels, update_stats)
        return logits

    def _check(self, x: Array, labels: Array | None) -> _DSpec:
        spec = by_image_size(_D_SPECS, self.image_size, "ResNet discriminator")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"unknown conditioning {self.conditioning!r}; choose one of "
                f"{CONDITIONINGS}"
            )
        if x.ndim != 4 or x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"this discriminator takes images (N, {self.image_size}, "
                f"{self.image_size}, C), got an array of shape {x.shape}"
            )
        _check_labels(self.num_classes, labels, "discriminator")
        return spec

    def _projection(self, h: Array, labels: Array, update_stats: bool) -> Array:
        """The class term ``<embed(labels), h>`` of the projection discriminator."""
        features = h.shape[-1]
        if self.norm == "spectral":
            embed = layers.SNEmbed(
                self.num_classes,
                features,
                n_init_steps=self.sn_init_steps,
                name="embed",
            )
            table = embed(labels, update_stats)
        else:
            embed = nn.Embed(
                self.num_classes, features, embedding_init=_plain_init, name="embed"
            )
            table = embed(labels)
        return jnp.sum(table * h, axis=-1)

    def _concat_labels(self, h: Array, labels: Array) -> Array:
        """Joins a class embedding, repeated over H and W, to ``h``'s channels."""
        embed = nn.Embed(
            self.num_classes,
            _CONCAT_FEATURES,
            embedding_init=_plain_init,
            dtype=self.dtype,
            name="concat_embed",
        )
        e = embed(labels)[:, None, None, :]
        e = jnp.broadcast_to(e, (*h.shape[:3], _CONCAT_FEATURES)).astype(h.dtype)
        return jnp.concatenate([h, e], axis=-1)
