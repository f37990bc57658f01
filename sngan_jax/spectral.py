"""Spectral normalization as pure functions of arrays (no Flax).

A kernel of rank >= 2 is viewed as a matrix whose columns are the output units:
``(prod(shape[:-1]), shape[-1])``. For a conv kernel in Flax's HWIO layout that
is ``(kh * kw * in, out)``. The largest singular value sigma of that matrix is
estimated by power iteration with a persistent left vector ``u`` of length
``out``, as in Miyato et al., "Spectral Normalization for Generative Adversarial
Networks" (ICLR 2018), Algorithm 1.

Writing ``W`` for the ``(out, in)`` matrix of the paper (the transpose of the
view above), one iteration is ``v = normalize(W^T u)``, ``u = normalize(W v)``
and ``sigma = u^T W v``. ``u`` and ``v`` are constants for the gradient, which
therefore flows through ``sigma`` only: the paper's equation 12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Power iteration is a handful of matrix-vector products; run them at full
# float32 precision so that TPUs and GPUs (bf16 / tf32 matmuls by default) give
# the same sigma as the CPU.
_PRECISION = jax.lax.Precision.HIGHEST


def as_matrix(w: jax.Array) -> jax.Array:
    """Views a kernel of rank >= 2 as the matrix ``(prod(shape[:-1]), out)``."""
    if w.ndim < 2:
        raise ValueError(
            f"spectral normalization needs a kernel of rank >= 2, got shape "
            f"{w.shape}; a bias or scale vector is not normalized"
        )
    return w.reshape(-1, w.shape[-1])


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def power_iteration(
    w: jax.Array, u: jax.Array, n_steps: int = 1, eps: float = 1e-12
) -> tuple[jax.Array, jax.Array]:
    """Runs ``n_steps`` power iterations; returns the new ``(u, v)``.

    Args:
      w: kernel of rank >= 2; the last axis is the output axis.
      u: left singular vector estimate, shape ``(w.shape[-1],)``.
      n_steps: number of iterations (a static Python int, >= 1).
      eps: lower bound on vector norms, to avoid dividing by zero.

    Returns:
      ``u`` of shape ``(out,)`` and ``v`` of shape ``(prod(shape[:-1]),)``, both
      unit vectors and both outside the gradient.
    """
    if n_steps < 1:
        raise ValueError(f"power_iteration needs n_steps >= 1, got {n_steps}")
    mat = jax.lax.stop_gradient(as_matrix(w))
    u = jax.lax.stop_gradient(u).astype(mat.dtype)

    def body(_, u):
        v = _normalize(jnp.matmul(mat, u, precision=_PRECISION), eps)
        return _normalize(jnp.matmul(v, mat, precision=_PRECISION), eps)

    # All but the last step only move u; the last one also yields the v that
    # goes with it.
    u = jax.lax.fori_loop(0, n_steps - 1, body, u)
    v = _normalize(jnp.matmul(mat, u, precision=_PRECISION), eps)
    u = _normalize(jnp.matmul(v, mat, precision=_PRECISION), eps)
    return u, v


def spectral_normalize(
    w: jax.Array,
    u: jax.Array,
    *,
    n_steps: int = 1,
    update: bool = True,
    eps: float = 1e-12,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Divides a kernel by its estimated largest singular value.

    Args:
      w: kernel of rank >= 2 (last axis: outputs; conv kernels are HWIO).
      u: persistent left singular vector estimate, shape ``(w.shape[-1],)``.
      n_steps: power iterations to run when ``update`` is true.
      update: if false, no iteration is run and ``u`` is returned unchanged;
        sigma is then computed from the stored ``u`` alone (``v`` is derived
        from it), so evaluation is deterministic and moves no state.
      eps: lower bound on norms and on sigma.

    Returns:
      ``(w_sn, u_new, sigma)``: the normalized kernel (same shape as ``w``), the
      new vector (shape of ``u``) and the scalar estimate of sigma. Gradients
      flow into ``w`` through both ``w`` and ``sigma``; ``u`` and ``v`` are
      constants.
    """
    if u.shape != (w.shape[-1],):
        raise ValueError(
            f"u has shape {u.shape}, but a kernel of shape {w.shape} needs a "
            f"vector of shape ({w.shape[-1]},)"
        )
    if update:
        u, v = power_iteration(w, u, n_steps, eps)
    else:
        u = jax.lax.stop_gradient(u)
        mat = jax.lax.stop_gradient(as_matrix(w))
        v = _normalize(jnp.matmul(mat, u.astype(mat.dtype), precision=_PRECISION), eps)
    # sigma = u^T W v with W = as_matrix(w)^T, differentiable in w only.
    wv = jnp.matmul(v, as_matrix(w), precision=_PRECISION)
    sigma = jnp.dot(wv, u.astype(wv.dtype), precision=_PRECISION)
    w_sn = w / jnp.maximum(sigma, eps).astype(w.dtype)
    return w_sn, u, sigma


def exact_sigma(w: jax.Array) -> jax.Array:
    """The largest singular value of ``as_matrix(w)``, by SVD (diagnostics)."""
    return singular_values(w)[0]


def singular_values(w: jax.Array) -> jax.Array:
    """All singular values of ``as_matrix(w)``, in decreasing order."""
    mat = as_matrix(jnp.asarray(w)).astype(jnp.float32)
    return jnp.linalg.svd(mat, compute_uv=False)
