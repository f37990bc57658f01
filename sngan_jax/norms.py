"""Discriminator normalizations by name: spectral and the paper's baselines.

``make_conv`` and ``make_dense`` build a discriminator layer with any of the
normalizations the paper compares (``NORMS``): spectral normalization
(``layers.SNConv``, ``layers.SNDense``), weight normalization (``WNConv``,
``WNDense``), layer normalization, batch normalization with batch statistics
(``BatchStatNorm``), or none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import channels, phases
from sngan_jax.layers import (
    Array,
    Initializer,
    SNConv,
    SNDense,
    add_bias,
    conv2d,
    default_kernel_init,
)

NORMS = ("spectral", "weight", "layer", "batch", "none")


class WNDense(nn.Module):
    """Dense layer with weight normalization (Salimans and Kingma, 2016).

    Each output unit's weight vector is ``scale * v / ||v||``; ``scale`` starts
    at the norm of the initial ``v``, so the layer starts as a plain dense one.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        kernel = _weight_normalize(self, kernel, self.eps)
        y = jnp.dot(x, kernel.astype(x.dtype))
        return add_bias(self, y, self.use_bias, nn.initializers.zeros)


class WNConv(nn.Module):
    """2-D convolution with weight normalization per output channel."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str | int = "SAME"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        kernel = _weight_normalize(self, kernel, self.eps)
        y = conv2d(x, kernel, self.strides, self.padding)
        return add_bias(self, y, self.use_bias, nn.initializers.zeros)


def _weight_normalize(module: nn.Module, kernel: Array, eps: float) -> Array:
    axes = tuple(range(kernel.ndim - 1))
    norm = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))
    scale = module.param("scale", lambda _: jax.lax.stop_gradient(norm))
    return kernel * (scale / jnp.maximum(norm, eps))


class BatchStatNorm(nn.Module):
    """Batch normalization with batch statistics only, for discriminators.

    A discriminator sees a fresh batch in every call, so it keeps no running
    averages. With ``axis_name`` set, the statistics are averaged across
    devices, so the per-device batches behave as one global batch.
    """

    axis_name: str | None = None
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Statistics in float32 whatever the activations' dtype.
        x32 = x.astype(jnp.float32)
        count = x32.size // x32.shape[-1]
        mean = channels.channel_sum(x32) / count
        mean_sq = channels.channel_sum(jnp.square(x32)) / count
        if self.axis_name is not None:
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon)
        mul = mul * self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        y = (x32 - channels.expand(mean, x.shape)) * channels.expand(mul, x.shape)
        return channels.add_bias(y, bias).astype(x.dtype)


LayerFn = Callable[[Array, bool], Array]


def make_conv(
    norm: str,
    features: int,
    kernel_size: tuple[int, int] = (3, 3),
    strides: tuple[int, int] = (1, 1),
    *,
    normalize_output: bool = True,
    axis_name: str | None = None,
    kernel_init: Initializer = default_kernel_init,
    sn_init_steps: int = 15,
    dtype: Any = jnp.float32,
) -> LayerFn:
    """A discriminator convolution with normalization ``norm`` (see ``NORMS``).

    Call it inside a compact method; the result is ``f(x, update_stats)``.
    ``spectral`` and ``weight`` normalize the kernel; ``layer`` and ``batch``
    normalize the output activations, which ``normalize_output=False`` turns off
    (for layers that feed a residual sum or the final score). ``dtype`` is the
    dtype of the computation; parameters stay float32. (This project's own
    layers compute in the dtype of their input.)
    """
    _check_norm(norm)
    common = dict(features=features, kernel_size=kernel_size, strides=strides)
    if norm == "spectral":
        return SNConv(**common, kernel_init=kernel_init, n_init_steps=sn_init_steps)
    if norm == "weight":
        conv = WNConv(**common, kernel_init=kernel_init)
    else:
        conv = nn.Conv(
            **common,
            kernel_init=kernel_init,
            dtype=dtype,
            conv_general_dilated=phases.conv_general_dilated,
        )
    post = _activation_norm(norm, normalize_output, axis_name, True, dtype)
    return lambda x, update_stats: post(conv(x))


def make_dense(
    norm: str,
    features: int,
    *,
    normalize_output: bool = True,
    axis_name: str | None = None,
    kernel_init: Initializer = default_kernel_init,
    sn_init_steps: int = 15,
    dtype: Any = jnp.float32,
) -> LayerFn:
    """A discriminator dense layer with normalization ``norm``; see make_conv."""
    _check_norm(norm)
    if norm == "spectral":
        return SNDense(features, kernel_init=kernel_init, n_init_steps=sn_init_steps)
    if norm == "weight":
        dense = WNDense(features, kernel_init=kernel_init)
    else:
        dense = nn.Dense(features, kernel_init=kernel_init, dtype=dtype)
    post = _activation_norm(norm, normalize_output, axis_name, False, dtype)
    return lambda x, update_stats: post(dense(x))


def _activation_norm(
    norm: str, enabled: bool, axis_name: str | None, conv_axes: bool, dtype: Any
) -> Callable[[Array], Array]:
    if not enabled or norm in ("spectral", "weight", "none"):
        return lambda x: x
    if norm == "layer":
        # Ba et al. normalize over every unit of a layer: C, H and W for convs.
        axes = (-3, -2, -1) if conv_axes else (-1,)
        return nn.LayerNorm(reduction_axes=axes, feature_axes=-1, dtype=dtype)
    return BatchStatNorm(axis_name=axis_name)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(
            f"unknown discriminator normalization {norm!r}; choose one of {NORMS}"
        )
