"""XLA options for the programs sngan-jax compiles, and the wrappers that apply them.

On the CPU, the XLA in jaxlib 0.10 hands convolutions to the YNNPACK library.
On the convolutions of these networks XLA's own (Eigen) convolutions are 1.5
to 4 times faster on 2 cores (SNDCGAN's 4x4 stride-2 layer, 64 channels,
32x32, batch 128: forward 0.030 s against 0.097 s, kernel gradient 0.058 s
against 0.22 s), and the SNDCGAN training iteration took 1.7 s instead of
2.7 s (1.17 s instead of 1.46 s on another machine, with the rest of
``phases`` in place). So on the CPU our programs compile with YNNPACK kept
for matrix products only. Other platforms get no options, and nothing else a
process compiles is touched.

``SNGAN_JAX_XLA_DEFAULTS=1`` turns the options off. An XLA that does not know
the option (another jaxlib) is detected once, with a warning, and gets none.

``use_persistent_cache`` keeps compiled programs on disk (JAX's persistent
compilation cache), so that a restarted or resumed run, and every point of a
sweep after the first, loads its programs instead of compiling them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sngan_jax.evaluation import cache_dir

DEFAULTS_ENV = "SNGAN_JAX_XLA_DEFAULTS"
CACHE_MAX_BYTES = 2**30  # the least recently used programs go beyond this
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


def use_persistent_cache(directory: str | None = None) -> str:
    """Keeps every program that takes a second or more to compile in ``directory``.

    Default: ``$SNGAN_JAX_CACHE/xla`` (see ``evaluation.cache_dir``). A folder
    already chosen with JAX's own ``JAX_COMPILATION_CACHE_DIR`` is kept. Call
    before the first compilation. Entries are keyed by the program, the
    compiler options, the devices and the jax and jaxlib versions, so a
    changed config or installation compiles afresh; the folder is trimmed to
    ``CACHE_MAX_BYTES``, least recently used first. Returns the folder.
    """
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = directory or cache_dir("xla")
        jax.config.update("jax_compilation_cache_dir", chosen)
    if jax.config.jax_compilation_cache_max_size < 0:  # JAX's default: no limit
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return chosen


def define_cache_flag() -> None:
    """Defines the commands' ``--compilation_cache`` flag (on by default).

    Declared as the calling command's own flag, so that its ``--help`` lists it.
    """
    caller = sys._getframe(1).f_globals["__name__"]
    flags.DEFINE_bool(
        "compilation_cache",
        True,
        "Keep compiled programs in $SNGAN_JAX_CACHE/xla for the next start to load.",
        # absl's name for a module run with -m is its path, as for the others.
        module_name=sys.argv[0] if caller == "__main__" else caller,
    )


def cache_if_flagged() -> None:
    """``use_persistent_cache()`` unless ``--nocompilation_cache`` was given."""
    if flags.FLAGS.compilation_cache:
        use_persistent_cache()
