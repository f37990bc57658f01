"""Stride-1 convolutions with few input or output channels, as matrix products.

The first layer of a discriminator reads 3 channels and the last layer of a
generator writes 3. XLA's CPU convolutions run such layers slowly, and their
kernel gradients slower still: XLA transposes the wide side of the layer
(the whole activation, batch last) before convolving. Written with one
matrix product over the kernel's taps, the same layers are plain dots, and
their gradients are dots too:

- few inputs (``k*k*C_in <= C_out``): the ``k*k`` shifted copies of the
  padded input side by side (``k*k*C_in`` columns, 27 for an RGB image and a
  3x3 kernel, gathered in one pass) times the kernel as a
  ``(k*k*C_in, C_out)`` matrix;
- few outputs (``k*k*C_out <= C_in``): the input times the kernel as a
  ``(C_in, k*k*C_out)`` matrix, then the ``k*k`` blocks of the product,
  shifted into place and added.

The kernel gradient is a product of the thin side, laid out channels first
(``k*k*C`` rows), with the wide activation as it lies, so nothing wide is
transposed; the input gradient is the other form of the same kind.

On 2 CPU cores, 32x32 inputs and 3x3 kernels: the generator's 64-to-3 layer
at batch 64 ran forward in 3 ms instead of 12 ms, its kernel gradient in
4 ms instead of 19 ms; the discriminator's 3-to-64 layer at batch 128 took
as long forward (17 ms) and 9 ms instead of 18 ms for its kernel gradient.
SNDCGAN's training iteration (n_dis 1) took 1.08 s instead of 1.14 s, both
compiled in one process and timed in turns.
``phases.conv`` uses these forms on the CPU where they apply; elsewhere the
convolution libraries handle such layers well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]


def form(
    x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], padding: Padding
) -> str | None:
    """``"inputs"`` or ``"outputs"``: the side thin enough for ``conv``; else None.

    None also where ``conv`` does not apply: not 2-D NHWC with an HWIO kernel,
    or a padding outside 0 to ``k - 1`` on some side.
    """
    if len(x_shape) != 4 or len(kernel_shape) != 4 or x_shape[-1] != kernel_shape[2]:
        return None
    kh, kw, c_in, c_out = kernel_shape
    for k, (lo, hi) in zip((kh, kw), padding, strict=True):
        if not (0 <= lo < k and 0 <= hi < k):
            return None
    if kh * kw * c_in <= c_out:
        return "inputs"
    if kh * kw * c_out <= c_in:
        return "outputs"
    return None


def conv(x: Array, kernel: Array, padding: Padding) -> Array:
    """Stride-1 NHWC convolution with an HWIO kernel, as ``form`` chooses.

    The same function as ``jax.lax.conv_general_dilated(x, kernel, (1, 1),
    padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` for paddings from
    0 to ``k - 1`` on each side, with products accumulated in float32 (or
    wider) and the result in ``x``'s dtype. Its gradients are computed in
    the same forms, to any order.
    """
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if form(x.shape, kernel.shape, padding) is None:
        raise ValueError(
            f"input {x.shape}, kernel {kernel.shape} and padding {padding}: no "
            "side has k*k*channels at most the other's channels, or a padding "
            "is outside 0..k-1; use jax.lax.conv_general_dilated"
        )
    return _conv(x, kernel.astype(x.dtype), padding)


def _dot(a: Array, b: Array) -> Array:
    accumulate = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.dot(a, b, preferred_element_type=accumulate)


def _out_size(x_shape, kernel_shape, padding) -> tuple[int, int]:
    return tuple(
        n + lo + hi - k + 1
        for n, k, (lo, hi) in zip(x_shape[1:3], kernel_shape[:2], padding, strict=True)
    )


def _pad(a: Array, padding: Padding, trailing: int = 1) -> Array:
    """Pads axes 1 and 2 of ``a``, leaving axis 0 and ``trailing`` last axes."""
    return jnp.pad(a, ((0, 0), *padding, *((0, 0),) * trailing))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: Array, kernel: Array, padding: Padding) -> Array:
    if form(x.shape, kernel.shape, padding) == "inputs":
        return _few_inputs(x, kernel, padding)
    return _few_outputs(x, kernel, padding)


def _few_inputs(x: Array, kernel: Array, padding: Padding) -> Array:
    kh, kw, c_in, c_out = kernel.shape
    oh, ow = _out_size(x.shape, kernel.shape, padding)
    # columns[n, h, w, i, j] = xp[n, h + i, w + j]: one gather, which XLA
    # emits as one loop (a concatenation of slices is one loop per slice).
    rows, cols = _window_indices(kh, kw, oh, ow, flip=False)
    columns = _pad(x, padding)[:, rows[:, None, :, None], cols[None, :, None, :]]
    columns = columns.reshape(*x.shape[:1], oh, ow, kh * kw * c_in)
    y = _dot(columns, kernel.reshape(kh * kw * c_in, c_out))
    return y.astype(x.dtype)


def _window_indices(kh: int, kw: int, oh: int, ow: int, flip: bool):
    """``(oh, kh)`` and ``(ow, kw)`` indices ``h + i`` and ``w + j``.

    ``flip``: ``h + kh - 1 - i`` and ``w + kw - 1 - j``.
    """
    i, j = np.arange(kh), np.arange(kw)
    if flip:
        i, j = i[::-1], j[::-1]
    return np.arange(oh)[:, None] + i[None, :], np.arange(ow)[:, None] + j[None, :]


def _few_outputs(x: Array, kernel: Array, padding: Padding) -> Array:
    kh, kw, c_in, c_out = kernel.shape
    oh, ow = _out_size(x.shape, kernel.shape, padding)
    # z[n, h, w, i, j] = x[n, h, w] @ kernel[i, j]: each input pixel's share of
    # every output pixel it reaches; output (h, w) sums z[h + i, w + j, i, j]
    # over the taps, in padded coordinates.
    matrix = kernel.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)
    z = _dot(x, matrix).reshape(*x.shape[:3], kh, kw, c_out)
    z = _pad(z, padding, trailing=3)
    y = sum(z[:, i : i + oh, j : j + ow, i, j] for i in range(kh) for j in range(kw))
    return y.astype(x.dtype)


def _columns_t(a: Array, kh: int, kw: int, padding: Padding, flip: bool) -> Array:
    """The thin ``a (N, H, W, C)`` as rows ``(kh*kw*C, N*oh*ow)``, one block a tap.

    Built channels first, so that the kernel gradient is a product whose
    long axis is the one it sums over, and the wide activation is read as it
    lies (XLA would transpose it, slowly, to sum over its leading axis).
    ``flip``: tap ``(i, j)`` reads at offset ``(kh-1-i, kw-1-j)``.
    """
    oh, ow = _out_size(a.shape, (kh, kw), padding)
    at = jnp.pad(jnp.moveaxis(a, 3, 0), ((0, 0), (0, 0), *padding))
    rows, cols = _window_indices(kh, kw, oh, ow, flip)
    # (C, N, kh, kw, oh, ow), gathered in one loop as in _few_inputs
    window = at[:, :, rows.T[:, None, :, None], cols.T[None, :, None, :]]
    return window.transpose(2, 3, 0, 1, 4, 5).reshape(kh * kw * a.shape[3], -1)


def _conv_fwd(x, kernel, padding):
    return _conv(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, residuals, g):
    x, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    # The input gradient: g convolved with the kernel turned by 180 degrees,
    # inputs and outputs swapped, padded to give x's size. Its thin side is
    # the other one, so it takes the other form.
    back = tuple(
        (k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding, strict=True)
    )
    turned = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _conv(g, turned, back)
    if form(x.shape, kernel.shape, padding) == "inputs":
        # dW[i, j, ci, co] = sum over pixels of xp[.., h+i, w+j, ci] g[.., co]
        rows = _columns_t(x, kh, kw, padding, flip=False)
        wide = g.reshape(-1, c_out)
        dk = _dot(rows, wide).reshape(kh, kw, c_in, c_out)
    else:
        # The same sum over x's pixels, g shifted by each tap instead.
        rows = _columns_t(g, kh, kw, back, flip=True)
        wide = x.reshape(-1, c_in)
        dk = _dot(rows, wide).reshape(kh, kw, c_out, c_in).transpose(0, 1, 3, 2)
    return dx, dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
