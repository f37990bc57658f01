"""Train state, the per-device discriminator and generator steps, and pmap.

One training step is the paper's Algorithm 1: ``n_dis`` discriminator updates,
each on a fresh real batch and a fresh fake batch, then one generator update.
The step function is written per device: it averages gradients, metrics and
batch-norm statistics over the axis ``AXIS`` and takes its share of every
random draw by ``axis_index``, so ``jax.pmap`` and ``jax.shard_map`` run it
alike. Random draws (z, fake labels, penalty interpolates) are made for the
global batch and sliced, so 1 device and N devices compute the same thing up
to float rounding.

The loop itself lives in ``loop.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sngan_jax import compiler, layers, losses, models, optim, phases
from sngan_jax.data import random_flip, to_model_input

AXIS = "batch"
Array = jax.Array
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: one pytree, checkpointed whole.

    ``g_ema_params`` is None when the config has no EMA (``ema_decay == 0``);
    ``d_spectral`` is the discriminator's ``"spectral"`` collection (empty for
    the baselines without spectral normalization); ``rng`` is a raw uint32 key.
    """

    step: Array
    g_params: Any
    g_batch_stats: Any
    g_opt_state: Any
    g_ema_params: Any
    d_params: Any
    d_spectral: Any
    d_opt_state: Any
    rng: Array


class Trainer:
    """The networks, losses and optimizers of a config, and its step functions."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.g, self.d = models.build(config.model, axis_name=AXIS)
        # Copies without collectives, for initialization and sampling outside
        # pmap; they have the same variables.
        self.g_local, self.d_local = models.build(config.model, axis_name=None)
        self.loss = losses.get(config.loss.name)
        total, n_dis = config.total_steps, config.n_dis
        self.g_tx = optim.create(config.optimizer, total, 1)
        self.d_tx = optim.create(
            config.optimizer, total, n_dis, clip=config.optimizer.clip_weights
        )
        self.global_batch = config.batch_size
        self.num_classes = config.model.num_classes
        self.z_dim = config.model.z_dim
        self._sample = compiler.jit(self._eval_generator)

    # --- initialization ------------------------------------------------------

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one real example as the discriminator sees it."""
        model = self.config.model
        if model.name == "mlp":
            return (2,)
        return (model.image_size, model.image_size, model.channels)

    def init_state(self, seed: int) -> TrainState:
        """A fresh train state (unreplicated) from an integer seed."""
        # One compiled program: initializing layer by layer would compile each
        # spectral layer's warm-up loop separately.
        key = jax.random.PRNGKey(seed)
        lowered = jax.jit(self._init_state).lower(key)
        # The program runs once, so on the CPU its compilation is the cost that
        # counts: without LLVM's optimizations it compiles about 4 times faster
        # (SNDCGAN: 2 s, not 8 s; mostly the random initializers) and runs in
        # 0.4 s instead of 0.1 s. Its values agree with the optimized program's
        # up to float rounding (at most 5e-7 in the configs checked).
        options = compiler.options()
        if jax.default_backend() == "cpu":
            options = {**options, "xla_backend_optimization_level": 0}
        return lowered.compile(compiler_options=options)(key)

    def _init_state(self, rng: Array) -> TrainState:
        rng, g_key, d_key = jax.random.split(rng, 3)
        z = jnp.zeros((2, self.z_dim))
        labels = jnp.zeros((2,), jnp.int32) if self.num_classes else None
        g_vars = self.g_local.init(g_key, z, labels, train=False)
        x = jnp.zeros((2, *self.input_shape()))
        d_vars = self.d_local.init(d_key, x, labels, update_stats=True)
        g_params = g_vars["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            g_params=g_params,
            g_batch_stats=g_vars.get("batch_stats", {}),
            g_opt_state=self.g_tx.init(g_params),
            g_ema_params=g_params if self.config.ema_decay > 0 else None,
            d_params=d_vars["params"],
            d_spectral=d_vars.get(layers.SPECTRAL, {}),
            d_opt_state=self.d_tx.init(d_vars["params"]),
            rng=rng,
        )

    # --- random draws, defined per global batch ------------------------------

    def _local_rows(self, x: Array, per_device: int) -> Array:
        """This device's rows of an array drawn for the global batch."""
        start = jax.lax.axis_index(AXIS) * per_device
        return jax.lax.dynamic_slice_in_dim(x, start, per_device)

    def draw_latents(self, key: Array, per_device: int) -> tuple[Array, Array | None]:
        """z ``(per_device, z_dim)`` and fake labels (or None), this device's share."""
        z_key, y_key = jax.random.split(key)
        z = jax.random.normal(z_key, (self.global_batch, self.z_dim))
        z = self._local_rows(z, per_device)
        if not self.num_classes:
            return z, None
        labels = jax.random.randint(y_key, (self.global_batch,), 0, self.num_classes)
        return z, self._local_rows(labels, per_device)

    # --- the updates ---------------------------------------------------------

    def generate(self, state: TrainState, z: Array, labels: Array | None) -> Array:
        """Fakes for a discriminator update (train-mode batch norm, no update)."""
        variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}
        fake, _ = self.g.apply(
            variables, z, labels, train=True, mutable=["batch_stats"]
        )
        return jax.lax.stop_gradient(fake)

    def d_loss(self, d_params, d_spectral, real, real_labels, fake, fake_labels, key):
        """Discriminator loss on one concatenated real + fake batch.

        The single call with ``update_stats=True`` runs exactly one power
        iteration per spectrally normalized layer.
        """
        x = jnp.concatenate([real, fake])
        labels = (
            None if real_labels is None else jnp.concatenate([real_labels, fake_labels])
        )
        logits, new_vars = self.d.apply(
            {"params": d_params, layers.SPECTRAL: d_spectral},
            x,
            labels,
            update_stats=True,
            mutable=[layers.SPECTRAL],
        )
        real_logits, fake_logits = jnp.split(logits, 2)
        loss = self.loss.d_loss(real_logits, fake_logits)
        metrics = {"d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
        if self.config.loss.gp_weight > 0:
            penalty = self._penalty(d_params, d_spectral, real, fake, real_labels, key)
            loss = loss + self.config.loss.gp_weight * penalty
            metrics["gp"] = penalty
        metrics["d_loss"] = loss
        return loss, (new_vars.get(layers.SPECTRAL, d_spectral), metrics)

    def _penalty(self, d_params, d_spectral, real, fake, labels, key):
        per_device = real.shape[0]
        shape = (self.global_batch,) + (1,) * (real.ndim - 1)
        eps = self._local_rows(jax.random.uniform(key, shape), per_device)
        variables = {"params": d_params, layers.SPECTRAL: d_spectral}

        def d_fn(x):
            with phases.direct_only():  # differentiated twice; see there
                return self.d.apply(variables, x, labels, update_stats=False)

        return losses.penalty_at(d_fn, eps * real + (1.0 - eps) * fake)

    def generate_all(self, state: TrainState, keys: Array, per_device: int):
        """The fakes (and labels) of several discriminator updates in one call.

        ``keys (n, 2)``: the updates' keys. The generator does not change
        between discriminator updates, so their fakes can be drawn together:
        vmapped, each update's batch keeps its own batch-norm statistics, and
        the step compiles one generator pass instead of ``n``.
        """

        def one(key):
            z, labels = self.draw_latents(jax.random.split(key, 3)[0], per_device)
            return self.generate(state, z, labels), labels

        return jax.vmap(one)(keys)

    def d_update(
        self,
        state: TrainState,
        real_batch: Mapping[str, Array],
        key: Array,
        fakes: tuple[Array, Array | None] | None = None,
    ):
        """One discriminator update; returns the new state and its metrics.

        ``fakes``: this update's fakes and their labels from ``generate_all``
        (the same draw from the same ``key``); drawn here when None.
        """
        z_key, gp_key, flip_key = jax.random.split(key, 3)
        real = to_model_input(real_batch["images"])
        if self.config.dataset.random_flip:
            flip = jax.random.bernoulli(flip_key, 0.5, (self.global_batch,))
            real = random_flip(real, self._local_rows(flip, real.shape[0]))
        real_labels = real_batch.get("labels") if self.num_classes else None
        if fakes is None:
            z, fake_labels = self.draw_latents(z_key, real.shape[0])
            fakes = self.generate(state, z, fake_labels), fake_labels
        fake, fake_labels = fakes
        grad_fn = jax.grad(self.d_loss, has_aux=True)
        grads, (spectral, metrics) = grad_fn(
            state.d_params,
            state.d_spectral,
            real,
            real_labels,
            fake,
            fake_labels,
            gp_key,
        )
        grads = jax.lax.pmean(grads, AXIS)
        updates, d_opt_state = self.d_tx.update(
            grads, state.d_opt_state, state.d_params
        )
        state = state.replace(
            d_params=optax.apply_updates(state.d_params, updates),
            d_spectral=spectral,
            d_opt_state=d_opt_state,
        )
        return state, metrics

    def g_update(self, state: TrainState, key: Array, per_device: int):
        """One generator update through the discriminator's stored vectors."""
        z, labels = self.draw_latents(key, per_device)
        d_vars = {"params": state.d_params, layers.SPECTRAL: state.d_spectral}

        def g_loss(g_params):
            variables = {"params": g_params, "batch_stats": state.g_batch_stats}
            fake, new_vars = self.g.apply(
                variables, z, labels, train=True, mutable=["batch_stats"]
            )
            logits = self.d.apply(d_vars, fake, labels, update_stats=False)
            return self.loss.g_loss(logits), new_vars.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(g_loss, has_aux=True)(
            state.g_params
        )
        grads = jax.lax.pmean(grads, AXIS)
        updates, g_opt_state = self.g_tx.update(
            grads, state.g_opt_state, state.g_params
        )
        g_params = optax.apply_updates(state.g_params, updates)
        state = state.replace(
            g_params=g_params,
            g_batch_stats=batch_stats,
            g_opt_state=g_opt_state,
            g_ema_params=self._ema(state.g_ema_params, g_params),
        )
        return state, {"g_loss": loss}

    def _ema(self, ema_params, g_params):
        if ema_params is None:
            return None
        decay = self.config.ema_decay
        return jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, ema_params, g_params
        )

    def train_step(
        self, state: TrainState, batch: Mapping[str, Array]
    ) -> tuple[TrainState, Metrics]:
        """One generator step: ``n_dis`` D updates, then one G update (per device).

        ``batch`` holds this device's real data for the step, with a leading
        axis of length ``n_dis``: ``images (n_dis, per-device batch, ...)``.
        """
        key = jax.random.fold_in(state.rng, state.step)
        d_keys = jax.random.split(jax.random.fold_in(key, 0), self.config.n_dis)

        per_device = batch["images"].shape[1]
        fakes = None
        if self.config.n_dis > 1:
            fakes = self.generate_all(state, d_keys, per_device)

        # Unrolled rather than lax.scan: XLA's CPU backend runs convolutions
        # inside a while loop several times slower (8x on the digits model).
        for i in range(self.config.n_dis):
            real_batch = {k: v[i] for k, v in batch.items()}
            mine = None if fakes is None else jax.tree.map(lambda x: x[i], fakes)
            state, metrics = self.d_update(state, real_batch, d_keys[i], mine)
        # metrics: those of the last discriminator update of the step.
        state, g_metrics = self.g_update(state, jax.random.fold_in(key, 1), per_device)
        metrics.update(g_metrics)
        metrics.update(sigma_range(state.d_spectral))
        # Read by the loop every step, to stop before a NaN weight is saved.
        metrics["g_params_finite"] = all_finite(state.g_params)
        metrics["d_params_finite"] = all_finite(state.d_params)
        metrics = jax.lax.pmean(metrics, AXIS)
        return state.replace(step=state.step + 1), metrics

    # --- sampling ------------------------------------------------------------

    def sample(
        self,
        g_params: Any,
        g_batch_stats: Any,
        z: Array,
        labels: Array | None = None,
    ) -> Array:
        """Generator output in eval mode (running batch-norm statistics); jitted."""
        return self._sample(g_params, g_batch_stats, z, labels)

    def _eval_generator(self, g_params, g_batch_stats, z, labels):
        variables = {"params": g_params, "batch_stats": g_batch_stats}
        return self.g_local.apply(variables, z, labels, train=False)


def all_finite(tree: Any) -> Array:
    """1.0 when no entry of ``tree`` is NaN or Inf, else 0.0 (a float32 scalar)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)).astype(jnp.float32)


def sigma_range(spectral_vars: Any) -> Metrics:
    """Min and max of the stored sigma over all normalized layers."""
    sigmas = list(layers.spectral_sigmas(spectral_vars).values())
    if not sigmas:
        return {}
    stacked = jnp.stack(sigmas)
    return {"sigma_min": jnp.min(stacked), "sigma_max": jnp.max(stacked)}


def shard_batches(batches: list[Mapping[str, Any]], num_devices: int) -> dict:
    """Stacks ``n_dis`` process batches and splits them across local devices.

    Returns arrays of shape ``(num_devices, n_dis, per-device batch, ...)``.
    """
    out = {}
    for key in batches[0]:
        stacked = np.stack([b[key] for b in batches])
        n_dis, per_process = stacked.shape[:2]
        per_device = per_process // num_devices
        stacked = stacked.reshape(n_dis, num_devices, per_device, *stacked.shape[2:])
        out[key] = np.swapaxes(stacked, 0, 1)
    return out


def pmap_train_step(
    trainer: Trainer,
    devices: Sequence[jax.Device] | None = None,
    vectorized: bool = False,
):
    """The per-device step under ``jax.pmap`` over ``devices`` (all local ones).

    ``vectorized``: the state has a leading axis of sweep points (states that
    differ in their optimizer hyperparameters) and every point trains on the
    same batch; the step is vmapped over that axis inside pmap.
    """
    step = trainer.train_step
    if vectorized:
        step = jax.vmap(step, in_axes=(0, None))
    return compiler.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def param_count(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(x.size for x in jax.tree.leaves(params))


# --- placing the state on the devices -----------------------------------------


def replicate(tree: Any, num_devices: int) -> Any:
    """Host arrays to arrays with a leading device axis, as pmap takes them."""
    return jax.tree.map(lambda x: np.broadcast_to(x, (num_devices, *np.shape(x))), tree)


def to_devices(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Replicates host arrays onto the devices exactly as the step returns them.

    The step's outputs carry a sharding named after its device axis; inputs
    placed any other way would make the second step compile again.
    """
    num_local = len(devices) if devices else jax.local_device_count()
    place = jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)
    return place(replicate(tree, num_local))


def unreplicate(tree: Any) -> Any:
    """The first local device's copy of a replicated pytree, as host arrays.

    Reads only this process's own shard: with several processes the arrays
    span devices this process cannot address.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
