"""Transposed convolutions computed by phases: pure functions.

A stride-``s`` transposed convolution writes every output pixel from a subset
of the kernel's taps that depends only on the pixel's position modulo ``s``
(its phase). Computing each phase as an ordinary stride-1 convolution and
interleaving the results gives the same function as ``lax.conv_transpose``
without the zeros that the dilated form feeds through the convolution, which
XLA's CPU backend differentiates slowly. ``layers.ConvTranspose`` and
``layers.SNConvTranspose`` compute with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def conv_transpose(
    x: Array, kernel: Array, strides: tuple[int, int], padding: str = "SAME"
) -> Array:
    """``jax.lax.conv_transpose`` (NHWC, HWIO, unflipped kernel), computed by phases.

    With stride ``s`` every output pixel ``(s*m + p, s*n + q)`` sees only the
    kernel taps ``kernel[kp::s, kq::s]`` of its phase ``(p, q)``, applied to the
    undilated input. So the transposed convolution is ``s*s`` ordinary stride-1
    convolutions with small kernels whose outputs are interleaved: the same
    function, without the zeros that ``lax.conv_transpose`` inserts into the
    input. XLA's CPU backend computes the kernel gradient of the dilated form
    about 20 times slower than this one (a 4x4 stride-2 layer, 128 channels,
    16x16 inputs, batch 64, 2 cores: 6.1 s against 0.29 s); the forward pass is
    faster too (0.16 s against 0.22 s). Only ``"SAME"`` padding with strides no
    larger than the kernel takes the phase path; anything else falls back to
    ``lax.conv_transpose``.
    """
    kernel = kernel.astype(x.dtype)
    size = kernel.shape[:2]
    if padding != "SAME" or any(s > k for s, k in zip(strides, size, strict=True)):
        return jax.lax.conv_transpose(
            x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    (sh, sw), (kh, kw) = strides, size
    rows = []
    for p in range(sh):
        taps_h, pad_h = _phase(kh, sh, p)
        cols = []
        for q in range(sw):
            taps_w, pad_w = _phase(kw, sw, q)
            cols.append(
                jax.lax.conv_general_dilated(
                    x,
                    kernel[taps_h][:, taps_w],
                    window_strides=(1, 1),
                    padding=(pad_h, pad_w),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )
            )
        rows.append(jnp.stack(cols, axis=3))  # (N, H, W, sw, C)
    y = jnp.stack(rows, axis=2)  # (N, H, sh, W, sw, C)
    n, h, _, w, _, c = y.shape
    return y.reshape(n, h * sh, w * sw, c)


def _phase(k: int, s: int, p: int) -> tuple[slice, tuple[int, int]]:
    """Kernel taps and input padding of output phase ``p`` along one axis.

    ``lax.conv_transpose`` with "SAME" padding dilates the input by ``s``, pads
    it by ``pad_a`` in front and correlates with the kernel, so output
    ``s*m + p`` takes tap ``t`` from input ``m + (p + t - pad_a) / s`` whenever
    that is a whole number.
    """
    pad_a = k - 1 if s > k - 1 else -(-(k + s - 2) // 2)
    first = (pad_a - p) % s
    taps = len(range(first, k, s))
    offset = (p + first - pad_a) // s  # input index of the first tap, minus m
    return slice(first, k, s), (-offset, offset + taps - 1)
