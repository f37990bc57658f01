"""Pieces the generators and discriminators share."""

from __future__ import annotations

from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import channels, phases

T = TypeVar("T")

BN_MOMENTUM = 0.9  # running-average momentum of the generators' batch norm


def by_image_size(table: dict[int, T], image_size: int, network: str) -> T:
    """``table[image_size]``, or an error naming the sizes ``network`` supports."""
    if image_size not in table:
        raise ValueError(
            f"the {network} is defined for image sizes {sorted(table)}, got "
            f"{image_size}; resize the data or pick another model"
        )
    return table[image_size]


def bn_relu(
    x: jax.Array, train: bool, axis_name: str | None, dtype: Any = jnp.float32
) -> jax.Array:
    """Batch norm (batch statistics when training) then ReLU; call in compact.

    ``dtype`` is that of the output; flax computes the statistics in float32.
    """
    bn = channels.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        axis_name=axis_name,
        dtype=dtype,
    )
    return nn.relu(bn(x))


def to_image(channels: int, dtype: Any, **kwargs) -> nn.Conv:
    """The generators' last layer: flax's 3x3 ``nn.Conv`` to ``channels``.

    Computed by ``phases.conv``, so that on the CPU this thin layer is a
    matrix product over the kernel's taps (see ``taps``); the variables are
    flax's. ``kwargs`` go to ``nn.Conv`` (an initializer, a name).
    """
    return nn.Conv(
        channels,
        (3, 3),
        dtype=dtype,
        conv_general_dilated=phases.conv_general_dilated,
        **kwargs,
    )
