"""Flax linen layers: the spectrally normalized ones, and the generator's.

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
The paper's other normalizations, and the factories that pick one by name,
are in ``norms``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sngan_jax import channels, phases, spectral

Array = jax.Array
Initializer = Callable[..., Array]

SPECTRAL = "spectral"

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
        return add_bias(self, y, self.use_bias, self.bias_init)


def conv2d(
    x: Array, kernel: Array, strides: tuple[int, int], padding: str | int
) -> Array:
    """NHWC convolution with an HWIO kernel; an int padding pads every side."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return phases.conv(x, kernel, strides, padding)


def add_bias(module: nn.Module, y: Array, use_bias: bool, init: Initializer) -> Array:
    if not use_bias:
        return y
    bias = module.param("bias", init, (y.shape[-1],))
    return channels.add_bias(y, bias)


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
        y = conv2d(x, kernel, self.strides, self.padding)
        return add_bias(self, y, self.use_bias, self.bias_init)


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
        return add_bias(self, y, self.use_bias, self.bias_init)


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
        return add_bias(self, y, self.use_bias, self.bias_init)


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
        x = channels.BatchNorm(
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


def spectral_sigmas(spectral_vars: Any) -> dict[str, Array]:
    """Flattens a ``"spectral"`` collection into ``{layer path: sigma}``."""
    flat = jax.tree_util.tree_flatten_with_path(spectral_vars)[0]
    out = {}
    for path, value in flat:
        keys = [getattr(p, "key", str(p)) for p in path]
        if keys[-1] == "sigma":
            out["/".join(keys[:-1])] = value
    return out
