"""The paper's standard CNN ("SNDCGAN", appendix B, Table 3) for 32 and 48 px.

Generator: dense to ``bottom x bottom x 8ch`` (4x4 for 32 px, 6x6 for 48 px)
with batch norm and ReLU, three 4x4 stride-2 transposed convolutions with
batch norm and ReLU to 4ch, 2ch and ch channels, then a 3x3 convolution to
RGB and tanh. Discriminator: seven convolutions with ch, ch, 2ch, 2ch, 4ch,
4ch and 8ch channels, alternating 3x3 stride 1 and 4x4 stride 2, each followed
by leaky ReLU (slope 0.1), then a dense layer to one logit. ``ch = 64`` gives
the paper's widths.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import layers, norms
from sngan_jax.models.common import bn_relu, by_image_size, to_image

# (channel multiple of ch, kernel size, stride) of the discriminator convs.
_D_CONVS = ((1, 3, 1), (1, 4, 2), (2, 3, 1), (2, 4, 2), (4, 3, 1), (4, 4, 2), (8, 3, 1))
_BOTTOM = {32: 4, 48: 6}


class DCGANGenerator(nn.Module):
    """Maps ``z (N, z_dim)`` to images ``(N, S, S, channels)`` in [-1, 1]."""

    image_size: int = 32
    ch: int = 64
    z_dim: int = 128
    channels: int = 3
    axis_name: str | None = None
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = True
    ) -> jax.Array:
        bottom = by_image_size(_BOTTOM, self.image_size, "SNDCGAN generator")
        # Batch norm over the dense layer's units before the reshape, as in the
        # authors' Chainer code (the paper's table leaves it implicit).
        dtype, axis = self.dtype, self.axis_name
        x = nn.Dense(bottom * bottom * 8 * self.ch, dtype=dtype)(z)
        x = bn_relu(x, train, axis, dtype)
        x = x.reshape(z.shape[0], bottom, bottom, 8 * self.ch)
        for mult in (4, 2, 1):
            # flax's ConvTranspose computed by phases: same function, and
            # its kernel gradient runs many times faster on CPU.
            x = layers.ConvTranspose(mult * self.ch, (4, 4), (2, 2), dtype=dtype)(x)
            x = bn_relu(x, train, axis, dtype)
        x = to_image(self.channels, dtype)(x)
        return jnp.tanh(x).astype(jnp.float32)


class DCGANDiscriminator(nn.Module):
    """Maps images ``(N, S, S, C)`` to logits ``(N,)``."""

    image_size: int = 32
    ch: int = 64
    norm: str = "spectral"
    axis_name: str | None = None
    sn_init_steps: int = 15
    dtype: Any = jnp.float32  # of the activations; parameters stay float32

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, update_stats: bool = True
    ) -> jax.Array:
        by_image_size(_BOTTOM, self.image_size, "SNDCGAN discriminator")
        x = x.astype(self.dtype)
        for mult, k, s in _D_CONVS:
            conv = norms.make_conv(
                self.norm,
                mult * self.ch,
                (k, k),
                (s, s),
                axis_name=self.axis_name,
                sn_init_steps=self.sn_init_steps,
                dtype=self.dtype,
            )
            x = nn.leaky_relu(conv(x, update_stats), 0.1)
        dense = norms.make_dense(
            self.norm,
            1,
            normalize_output=False,
            sn_init_steps=self.sn_init_steps,
            dtype=self.dtype,
        )
        logits = dense(x.reshape(x.shape[0], -1), update_stats)[:, 0]
        return logits.astype(jnp.float32)
