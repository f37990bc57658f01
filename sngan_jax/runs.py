"""Finished runs in a notebook: ``sngan_jax.load(workdir)``.

Loading needs no training code, data set or flags, and works on any machine:
checkpoints hold host arrays, so a run trained on 8 accelerators opens on a
laptop CPU. The returned ``Run`` samples (deterministically for a seed),
interpolates in latent space and shows the discriminator's spectral state.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sngan_jax import checkpoints, layers, models, spectral
from sngan_jax.images import to_uint8


def load(
    path: str, step: int | None = None, ema: bool = True, best: bool = False
) -> Run:
    """Opens the run in ``path`` (a workdir or its ``checkpoints`` folder).

    ``step`` picks a checkpoint (default: the latest). ``ema`` uses the
    generator's moving average; a run trained without one falls back to the
    raw weights with a warning. ``best`` opens the checkpoint with the best
    evaluation score instead (kept when the run evaluated during training).
    """
    return Run(path, step, ema, best)


class Run:
    """One checkpoint of a run: its config, generator and discriminator."""

    def __init__(
        self, path: str, step: int | None = None, ema: bool = True, best: bool = False
    ):
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.basename(path) in ("checkpoints", "best"):
            path = os.path.dirname(path)
        folder = "best" if best else "checkpoints"
        if not os.path.isdir(checkpoints.checkpoint_dir(path, folder)):
            what = (
                "best checkpoint (kept when eval_every > 0)" if best else "checkpoints"
            )
            raise FileNotFoundError(
                f"no {what} under {path}; pass a training workdir "
                f"(the --workdir of sngan_jax.main)"
            )
        self.workdir = path
        self.ema = ema
        self._ckpt = checkpoints.Checkpointer(path, name=folder)
        self.load_step(step)

    def steps_available(self) -> list[int]:
        """The steps that have a checkpoint, oldest first."""
        return self._ckpt.all_steps()

    def load_step(self, step: int | None = None) -> None:
        """Switches to the checkpoint of ``step`` (default: the latest)."""
        steps = self.steps_available()
        if not steps:
            raise FileNotFoundError(f"the workdir {self.workdir} has no checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step}; there are {steps}")
        state, _, config = self._ckpt.restore(step)
        self.config = ml_collections.ConfigDict(config)
        self.step = int(state["step"])
        self.state = state
        self.generator, self.discriminator = models.build(self.config.model)
        self.g_params = self._generator_params(state)
        self._apply = jax.jit(self._generate)  # params are arguments, not constants

    def _generator_params(self, state: dict) -> Any:
        if not self.ema:
            return state["g_params"]
        if state.get("g_ema_params") is None:
            warnings.warn(
                "this run was trained without an EMA generator (ema_decay=0); "
                "using the raw generator weights",
                stacklevel=5,  # at the caller of sngan_jax.load
            )
            return state["g_params"]
        return state["g_ema_params"]

    # --- sampling ------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return int(self.config.model.num_classes)

    def _generate(self, variables: Any, z: jax.Array, labels: Any) -> jax.Array:
        return self.generator.apply(variables, z, labels, train=False)

    def latents(self, num: int, seed: int = 0) -> np.ndarray:
        """The ``(num, z_dim)`` latents that ``sample(num, seed)`` uses."""
        return np.asarray(
            jax.random.normal(jax.random.PRNGKey(seed), (num, self._z_dim))
        )

    @property
    def _z_dim(self) -> int:
        return int(self.config.model.z_dim)

    def generate(
        self, z: np.ndarray, labels: Any = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Generator output for given latents: uint8 images, or float points."""
        labels = self._labels(labels, len(z), seed=0)
        batch_size = batch_size or 256
        variables = {
            "params": self.g_params,
            "batch_stats": self.state["g_batch_stats"],
        }
        outputs = []
        for start in range(0, len(z), batch_size):
            chunk = slice(start, start + batch_size)
            y = None if labels is None else jnp.asarray(labels[chunk])
            outputs.append(np.asarray(self._apply(variables, jnp.asarray(z[chunk]), y)))
        out = np.concatenate(outputs)
        return out if self.config.model.name == "mlp" else to_uint8(out)

    def sample(
        self,
        num: int,
        seed: int = 0,
        labels: Any = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """``num`` samples: uint8 ``(num, H, W, C)``, or points ``(num, 2)``.

        The same seed gives the same samples on every call and machine.
        ``labels`` (conditional runs) is one class for all, or one per sample;
        by default the classes are drawn from the seed.
        """
        labels = self._labels(labels, num, seed)
        return self.generate(self.latents(num, seed), labels, batch_size)

    def interpolate(
        self,
        num_steps: int,
        seed: int = 0,
        method: str = "spherical",
        labels: Any = None,
    ) -> np.ndarray:
        """Samples along a path between two latents drawn from ``seed``.

        ``method`` is ``spherical`` (along the great circle, which keeps the
        latents at the norm the generator was trained on) or ``linear``.
        """
        z0, z1 = self.latents(2, seed)
        t = np.linspace(0.0, 1.0, num_steps)[:, None]
        if method == "linear":
            z = (1 - t) * z0 + t * z1
        elif method == "spherical":
            z = _slerp(z0, z1, t)
        else:
            raise ValueError(f"method must be 'spherical' or 'linear', got {method!r}")
        if labels is None and self.num_classes:
            labels = int(self._labels(None, 1, seed)[0])
        return self.generate(z.astype(np.float32), labels)

    def _labels(self, labels: Any, num: int, seed: int) -> np.ndarray | None:
        if not self.num_classes:
            if labels is not None:
                raise ValueError("this run is not class-conditional; drop labels")
            return None
        if labels is None:
            key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
            return np.asarray(jax.random.randint(key, (num,), 0, self.num_classes))
        labels = np.broadcast_to(np.asarray(labels, np.int32), (num,))
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return labels

    # --- the discriminator's spectral state ----------------------------------

    def spectral_table(self) -> list[dict[str, Any]]:
        """Per normalized layer: stored (power-iteration) sigma against SVD.

        Rows hold ``layer``, ``shape`` (the kernel's), ``sigma`` (the stored
        estimate), ``sigma_exact`` and ``rel_error``.
        """
        rows = []
        for name, kernel, sigma in self._spectral_layers():
            exact = float(spectral.exact_sigma(kernel))
            rows.append(
                {
                    "layer": name,
                    "shape": tuple(kernel.shape),
                    "sigma": float(sigma),
                    "sigma_exact": exact,
                    "rel_error": abs(float(sigma) - exact) / exact,
                }
            )
        return rows

    def singular_values(self) -> dict[str, np.ndarray]:
        """Singular values of each normalized kernel ``W / sigma``, decreasing."""
        return {
            name: np.asarray(spectral.singular_values(kernel)) / float(sigma)
            for name, kernel, sigma in self._spectral_layers()
        }

    def plot_spectra(self, ax: Any = None) -> Any:
        """The paper's view: squared singular values of each normalized layer.

        One line per layer, the index scaled to [0, 1]; returns the axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        for name, values in self.singular_values().items():
            ax.plot(np.linspace(0, 1, len(values)), values**2, label=name)
        ax.set_xlabel("index of singular value (scaled to [0, 1])")
        ax.set_ylabel("squared singular value of W / sigma")
        ax.set_title(f"discriminator spectra at step {self.step}")
        ax.legend(fontsize="small")
        return ax

    def _spectral_layers(self) -> list[tuple[str, np.ndarray, float]]:
        """(layer path, kernel, stored sigma) of each normalized layer."""
        params = self.state["d_params"]
        out = []
        for name, sigma in layers.spectral_sigmas(self.state["d_spectral"]).items():
            node = params
            for key in name.split("/"):
                node = node[key]
            kernel = node["kernel"] if "kernel" in node else node["embedding"]
            out.append((name, np.asarray(kernel), float(sigma)))
        return out


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A saved config with the fields added since it was saved, at their defaults."""
    from configs import common

    merged = common.base()
    _merge(merged, config.to_dict())
    return merged


def _merge(target: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and key in target:
            _merge(target[key], value)
        else:
            with target.ignore_type():
                target[key] = value


def _slerp(z0: np.ndarray, z1: np.ndarray, t: np.ndarray) -> np.ndarray:
    cos = np.dot(z0, z1) / (np.linalg.norm(z0) * np.linalg.norm(z1))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:
        return (1 - t) * z0 + t * z1
    return (np.sin((1 - t) * omega) * z0 + np.sin(t * omega) * z1) / np.sin(omega)
