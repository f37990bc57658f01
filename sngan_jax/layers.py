"""Flax linen layers: spectrally normalized layers and the paper's baselines.

The spectrally normalized layers (``SNDense``, ``SNConv``, ``SNConvTranspose``,
``SNEmbed``) keep their power-iteration vector ``u`` and the last estimate of
``sigma`` in the mutable collection ``"spectral"``; the generator's batch norm
owns ``"batch_stats"``, so the two never mix. Each is called with a boolean
``update_stats``: true in a discriminator update (one power iteration, written
back when ``"spectral"`` is mutable), false everywhere else (the stored vector
is used as it is and nothing is written).

At initialization each layer runs ``n_init_steps`` power iterations from a
random vector so that sigma starts near its true value instead of at a random
underestimate.

``make_conv`` and ``make_dense`` build a discriminator layer with any of the
normalizations that the paper compares: spectral, weight, layer, batch, none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import phases, spectral

Array = jax.Array
Initializer = Callable[..., Array]

SPECTRAL = "spectral"
NORMS = ("spectral", "weight", "layer", "batch", "none")

default_kernel_init = nn.initializers.xavier_uniform()


def _spectral_kernel(
    module: nn.Module,
    kernel: Array,
    update_stats: bool,
    n_steps: int,
    n_init_steps: int,
    eps: float,
) -> Array:
    """Normalizes ``kernel`` with the vector stored in ``module``'s collection."""

    def init_u():
        u0 = jax.random.normal(module.make_rng("params"), kernel.shape[-1:])
        if n_init_steps == 0:
            return u0 / jnp.linalg.norm(u0)
        return spectral.power_iteration(kernel, u0, n_init_steps, eps)[0]

    u = module.variable(SPECTRAL, "u", init_u)
    sigma = module.variable(SPECTRAL, "sigma", jnp.zeros, (), jnp.float32)
    # Initialization already ran its own iterations; do not add one more.
    update = update_stats and not module.is_initializing()
    kernel_sn, u_new, sigma_new = spectral.spectral_normalize(
        kernel, u.value, n_steps=n_steps, update=update, eps=eps
    )
    if update or module.is_initializing():
        u.value = u_new
        sigma.value = jax.lax.stop_gradient(sigma_new).astype(jnp.float32)
    return kernel_sn


class SNDense(nn.Module):
    """Dense layer whose kernel ``(in, features)`` is spectrally normalized."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    n_steps: int = 1
    n_init_steps: int = 15
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: Array, update_stats: bool) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        kernel = _spectral_kernel(
            self, kernel, update_stats, self.n_steps, self.n_init_steps, self.eps
        )
        y = jnp.dot(x, kernel.astype(x.dtype))
        return _add_bias(self, y, self.use_bias, self.bias_init)


def _conv2d(
    x: Array, kernel: Array, strides: tuple[int, int], padding: str | int
) -> Array:
    """NHWC convolution with an HWIO kernel; an int padding pads every side."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return phases.conv(x, kernel, strides, padding)


def _add_bias(module: nn.Module, y: Array, use_bias: bool, init: Initializer) -> Array:
    if not use_bias:
        return y
    bias = module.param("bias", init, (y.shape[-1],))
    return y + bias.astype(y.dtype)


class SNConv(nn.Module):
    """2-D convolution (NHWC, HWIO kernel) with a spectrally normalized kernel."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str | int = "SAME"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    n_steps: int = 1
    n_init_steps: int = 15
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: Array, update_stats: bool) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        kernel = _spectral_kernel(
            self, kernel, update_stats, self.n_steps, self.n_init_steps, self.eps
        )
        y = _conv2d(x, kernel, self.strides, self.padding)
        return _add_bias(self, y, self.use_bias, self.bias_init)


class ConvTranspose(nn.Module):
    """``flax.linen.ConvTranspose`` with the same kernel, computed by phases.

    Parameters ``kernel (kh, kw, in, features)`` and ``bias`` have the shapes,
    meaning and default initializers of the flax layer (``transpose_kernel``
    false); only the computation differs (see ``phases.conv_transpose``).
    """

    features: int
    kernel_size: tuple[int, int] = (4, 4)
    strides: tuple[int, int] = (2, 2)
    padding: str = "SAME"
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None  # of the computation (None: the input's); parameters float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = phases.conv_transpose(x, kernel, self.strides, self.padding)
        return _add_bias(self, y, self.use_bias, self.bias_init)


class SNConvTranspose(nn.Module):
    """Transposed 2-D convolution with a spectrally normalized HWIO kernel.

    The kernel has the layout and semantics of ``flax.linen.ConvTranspose``
    (``transpose_kernel=False``); it is normalized as the matrix
    ``(kh * kw * in, out)``, like every other kernel here.
    """

    features: int
    kernel_size: tuple[int, int] = (4, 4)
    strides: tuple[int, int] = (2, 2)
    padding: str = "SAME"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    n_steps: int = 1
    n_init_steps: int = 15
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: Array, update_stats: bool) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        kernel = _spectral_kernel(
            self, kernel, update_stats, self.n_steps, self.n_init_steps, self.eps
        )
        y = phases.conv_transpose(x, kernel, self.strides, self.padding)
        return _add_bias(self, y, self.use_bias, self.bias_init)


class SNEmbed(nn.Module):
    """Class embedding ``(num_embeddings, features)``, spectrally normalized.

    Used by the projection discriminator, whose class term is
    ``<embed(y), h>``: bounding the table's largest singular value bounds that
    term like every other layer.
    """

    num_embeddings: int
    features: int
    embedding_init: Initializer = default_kernel_init
    n_steps: int = 1
    n_init_steps: int = 15
    eps: float = 1e-12

    @nn.compact
    def __call__(self, labels: Array, update_stats: bool) -> Array:
        table = self.param(
            "embedding", self.embedding_init, (self.num_embeddings, self.features)
        )
        table = _spectral_kernel(
            self, table, update_stats, self.n_steps, self.n_init_steps, self.eps
        )
        return jnp.take(table, labels, axis=0)


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
        return _add_bias(self, y, self.use_bias, nn.initializers.zeros)


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
        y = _conv2d(x, kernel, self.strides, self.padding)
        return _add_bias(self, y, self.use_bias, nn.initializers.zeros)


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
        axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axes)
        mean_sq = jnp.mean(jnp.square(x32), axis=axes)
        if self.axis_name is not None:
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (y * scale + bias).astype(x.dtype)


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose scale and offset are looked up per class.

    The generator's normalization in class-conditional models (de Vries et al.,
    2017; Miyato and Koyama, 2018). Running statistics are shared by all
    classes and live in ``"batch_stats"`` like those of ``nn.BatchNorm``.
    """

    num_classes: int
    axis_name: str | None = None
    momentum: float = 0.9
    dtype: Any = jnp.float32  # of the computation; parameters stay float32

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool) -> Array:
        x = nn.BatchNorm(
            use_running_average=not train,
            use_scale=False,
            use_bias=False,
            momentum=self.momentum,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )(x)
        features = x.shape[-1]
        scale = nn.Embed(
            self.num_classes,
            features,
            embedding_init=nn.initializers.ones,
            dtype=self.dtype,
        )
        bias = nn.Embed(
            self.num_classes,
            features,
            embedding_init=nn.initializers.zeros,
            dtype=self.dtype,
        )
        return x * scale(labels)[:, None, None, :] + bias(labels)[:, None, None, :]


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


def spectral_sigmas(spectral_vars: Any) -> dict[str, Array]:
    """Flattens a ``"spectral"`` collection into ``{layer path: sigma}``."""
    flat = jax.tree_util.tree_flatten_with_path(spectral_vars)[0]
    out = {}
    for path, value in flat:
        keys = [getattr(p, "key", str(p)) for p in path]
        if keys[-1] == "sigma":
            out["/".join(keys[:-1])] = value
    return out
