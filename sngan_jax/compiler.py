"""XLA options for the programs sngan-jax compiles, and the wrappers that apply them.

On the CPU, the XLA in jaxlib 0.10 hands convolutions to the YNNPACK library.
On the convolutions of these networks XLA's own (Eigen) convolutions are 1.5
to 4 times faster on 2 cores (SNDCGAN's 4x4 stride-2 layer, 64 channels,
32x32, batch 128: forward 0.030 s against 0.097 s, kernel gradient 0.058 s
against 0.22 s), and the SNDCGAN training iteration takes 1.7 s instead of
2.7 s. So on the CPU our programs compile with YNNPACK kept for matrix
products only. Other platforms get no options, and nothing else a process
compiles is touched.

``SNGAN_JAX_XLA_DEFAULTS=1`` turns the options off. An XLA that does not know
the option (another jaxlib) is detected once, with a warning, and gets none.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULTS_ENV = "SNGAN_JAX_XLA_DEFAULTS"
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


@functools.cache
def options(platform: str | None = None) -> dict[str, Any]:
    """The options our programs compile with on ``platform`` (default backend)."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
        return {}
    try:
        probe = jax.jit(lambda x: x + 1).lower(jnp.zeros(()))
        probe.compile(compiler_options=CPU_OPTIONS)
    except Exception as e:  # an XLA without this option
        logging.warning("XLA's default CPU convolutions kept: %s", e)
        return {}
    return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit(fn, **kwargs)`` with our options."""
    return jax.jit(fn, compiler_options=options() or None, **kwargs)


def pmap(fn: Callable, **kwargs) -> Callable:
    """``jax.pmap(fn, **kwargs)`` with our options (where there are any).

    ``jax.pmap`` takes no compiler options, so the pmapped function is compiled
    ahead of time, once per signature of its arguments, and called compiled.
    Only in a single-process run: across processes ``pmap`` lowers with the
    global shapes and is called with local ones, so there the options are
    not applied.
    """
    pmapped = jax.pmap(fn, **kwargs)
    chosen = options(_platform(kwargs.get("devices")))
    if not chosen or jax.process_count() > 1:
        return pmapped
    return _Compiled(pmapped, chosen)


def _platform(devices) -> str:
    return devices[0].platform if devices else jax.default_backend()


class _Compiled:
    """A pmapped function compiled with ``options`` for each argument signature."""

    def __init__(self, pmapped: Callable, options: dict[str, Any]):
        self._pmapped, self._options = pmapped, options
        self._programs: dict[Any, Any] = {}
        functools.update_wrapper(self, pmapped)

    def lower(self, *args):
        return self._pmapped.lower(*args)

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple(_signature(x) for x in leaves))
        program = self._programs.get(key)
        if program is None:
            program = self._pmapped.lower(*args).compile(compiler_options=self._options)
            self._programs[key] = program
        return program(*args)


def _signature(x) -> tuple:
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.aval.weak_type)
    x = np.asarray(x)
    return (x.shape, x.dtype, False)
