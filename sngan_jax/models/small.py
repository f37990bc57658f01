"""Small networks for the embedded data sets: 2-D points and 8 or 16 px images.

They train in minutes on a laptop CPU, which is what the stability studies on
Gaussian mixtures and the default digits run need. The image pair is a
scaled-down SNDCGAN: upsampling by nearest neighbour plus a 3x3 convolution in
the generator, alternating 3x3 stride-1 and 4x4 stride-2 convolutions with
leaky ReLU in the discriminator.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import norms
from sngan_jax.models.common import bn_relu, by_image_size, to_image

# Image size -> number of 2x stages from (or down to) the 4x4 bottom.
_STAGES = {8: 1, 16: 2}


class MLPGenerator(nn.Module):
    """Maps ``z (N, z_dim)`` to points ``(N, out_dim)``."""

    hidden: int = 128
    depth: int = 3
    out_dim: int = 2
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = True
    ) -> jax.Array:
        x = z
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.out_dim, dtype=self.dtype)(x).astype(jnp.float32)


class MLPDiscriminator(nn.Module):
    """Maps points ``(N, D)`` to logits ``(N,)``."""

    hidden: int = 128
    depth: int = 3
    norm: str = "spectral"
    axis_name: str | None = None
    sn_init_steps: int = 15
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, update_stats: bool = True
    ) -> jax.Array:
        opts = dict(
            axis_name=self.axis_name, sn_init_steps=self.sn_init_steps, dtype=self.dtype
        )
        x = x.astype(self.dtype)
        for _ in range(self.depth):
            x = nn.relu(
                norms.make_dense(self.norm, self.hidden, **opts)(x, update_stats)
            )
        out = norms.make_dense(self.norm, 1, normalize_output=False, **opts)
        return out(x, update_stats)[:, 0].astype(jnp.float32)


class SmallGenerator(nn.Module):
    """Maps ``z (N, z_dim)`` to images ``(N, S, S, channels)`` in [-1, 1]."""

    image_size: int = 8
    ch: int = 32
    channels: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = True
    ) -> jax.Array:
        stages = by_image_size(_STAGES, self.image_size, "small image generator")
        dtype, axis = self.dtype, self.axis_name

        # Layers followed by batch norm have no bias: the norm removes it, and
        # its gradient would be pure rounding noise, which Adam amplifies.
        width = self.ch * 2**stages
        x = nn.Dense(4 * 4 * width, use_bias=False, dtype=dtype)(z)
        x = bn_relu(x.reshape(z.shape[0], 4, 4, width), train, axis, dtype)
        for _ in range(stages):
            width //= 2
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.Conv(width, (3, 3), use_bias=False, dtype=dtype)(x)
            x = bn_relu(x, train, axis, dtype)
        x = to_image(self.channels, dtype)(x)
        return jnp.tanh(x).astype(jnp.float32)


class SmallDiscriminator(nn.Module):
    """Maps images ``(N, S, S, C)`` with S in (8, 16) to logits ``(N,)``."""

    image_size: int = 8
    ch: int = 32
    norm: str = "spectral"
    axis_name: str | None = None
    sn_init_steps: int = 15
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, update_stats: bool = True
    ) -> jax.Array:
        stages = by_image_size(_STAGES, self.image_size, "small discriminator")
        opts = dict(
            axis_name=self.axis_name, sn_init_steps=self.sn_init_steps, dtype=self.dtype
        )
        x = x.astype(self.dtype)
        width = self.ch
        for _ in range(stages):
            for k, s in ((3, 1), (4, 2)):
                conv = norms.make_conv(self.norm, width, (k, k), (s, s), **opts)
                x = nn.leaky_relu(conv(x, update_stats), 0.1)
            width *= 2
        conv = norms.make_conv(self.norm, width, (3, 3), **opts)
        x = nn.leaky_relu(conv(x, update_stats), 0.1)
        out = norms.make_dense(self.norm, 1, normalize_output=False, **opts)
        return out(x.reshape(x.shape[0], -1), update_stats)[:, 0].astype(jnp.float32)
