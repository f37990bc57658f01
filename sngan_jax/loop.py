"""The training loop: ``train_and_evaluate(config, workdir)``.

It resumes from the workdir's latest checkpoint when there is one, feeds
``n_dis`` real batches per step to the pmapped step function, reads each
step's metrics after the next step is dispatched (so the devices never wait
for logging), and writes metrics, samples and checkpoints on their schedules.
Every ``eval_every`` steps it scores the generator (``config.eval``) and keeps
the checkpoint with the best score in ``<workdir>/best``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sngan_jax import checkpoints, data, images, train, validate, writers
from sngan_jax.evaluation import evaluator, records, toy

NUM_SAMPLES = 64  # images in a sample grid
NUM_POINTS = 2500  # points scored and drawn for the 2-D mixtures


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    devices: Sequence[jax.Device] | None = None,
) -> train.TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state on the host.

    ``devices`` restricts a single-process run to some local devices (tests
    use it to compare device counts); by default every device takes part.
    """
    if devices is not None and jax.process_count() > 1:
        raise ValueError("devices= is for single-process runs; use every device")
    num_devices = len(devices) if devices else jax.device_count()
    validate.check(config, num_devices)
    stream, info = open_data(config)
    validate.check_data(config, info)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    check_resume(config, ckpt)
    is_main = jax.process_index() == 0
    write_config(config, workdir)  # only once the config has passed every check

    scorer = Scorer(config, workdir) if config.eval_every else None
    trainer = train.Trainer(config)
    writer = writers.MetricWriter(workdir, enabled=is_main)
    state = _restore_or_init(trainer, ckpt, stream, writer)

    try:
        state = _run(config, trainer, state, stream, ckpt, writer, devices, scorer)
    finally:
        ckpt.wait()
        if scorer is not None:
            scorer.close()
        writer.close()
    return state


def open_data(config) -> tuple[Any, data.DataInfo]:
    """This process's stream of the config's data, and what the model must match."""
    return data.create(
        config.dataset,
        config.batch_size,
        config.seed,
        image_size=config.model.image_size,
        channels=config.model.channels,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def write_config(config, workdir: str) -> None:
    """``<workdir>/config.json`` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")


def check_resume(config, ckpt) -> None:
    """Warns about (or refuses, see validate) a changed config on resume."""
    step = ckpt.latest_step()
    if step is None:
        return
    for line in validate.check_resume(config, ckpt.saved_config(step)):
        writers.console(f"warning: resuming with a changed config, {line}")


def _restore_or_init(trainer, ckpt, stream, writer) -> train.TrainState:
    state = jax.device_get(trainer.init_state(trainer.config.seed))
    step = ckpt.latest_step()
    if step is None:
        return state
    state, data_state, _ = ckpt.restore(step, template=state)
    stream.set_state(data_state)
    writer.truncate_after(step)
    writers.console(f"resumed from the checkpoint at step {step}")
    return state


def _run(
    config, trainer, state, stream, ckpt, writer, devices, scorer
) -> train.TrainState:
    # devices=None lets pmap span every device of every process; a list of
    # local devices would make each process train on its own.
    p_step = train.pmap_train_step(trainer, devices)
    num_local = len(devices) if devices else jax.local_device_count()
    state = to_devices(state, devices)
    first_step = int(state.step[0])
    clock = Clock(config, first_step)
    pending = None
    for step in range(first_step + 1, config.total_steps + 1):
        batches = [next(stream) for _ in range(config.n_dis)]
        state, metrics = p_step(state, train.shard_batches(batches, num_local))
        if pending is not None:
            log_metrics(config, writer, clock, *pending)
        pending = (step, metrics) if step % config.log_every == 0 else None
        clock.tick(step)
        if step % config.sample_every == 0 or step == config.total_steps:
            write_samples(config, trainer, writer, state, step)
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            save_checkpoint(config, ckpt, state, stream)
        if scorer and (step % config.eval_every == 0 or step == config.total_steps):
            scorer.score(trainer, writer, state, stream, step)
    if pending is not None:
        log_metrics(config, writer, clock, *pending)
    return unreplicate(state)


def replicate(tree: Any, num_devices: int) -> Any:
    """Host arrays to arrays with a leading device axis, as pmap takes them."""
    return jax.tree.map(lambda x: np.broadcast_to(x, (num_devices, *np.shape(x))), tree)


def to_devices(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Replicates host arrays onto the devices exactly as the step returns them.

    The step's outputs carry a sharding named after its device axis; inputs
    placed any other way would make the second step compile again.
    """
    num_local = len(devices) if devices else jax.local_device_count()
    place = jax.pmap(lambda x: x, axis_name=train.AXIS, devices=devices)
    return place(replicate(tree, num_local))


def unreplicate(tree: Any) -> Any:
    """The first local device's copy of a replicated pytree, as host arrays.

    Reads only this process's own shard: with several processes the arrays
    span devices this process cannot address.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def save_checkpoint(config, ckpt, state, stream) -> None:
    host_state = unreplicate(state)
    step = int(host_state.step)
    ckpt.save(step, host_state, stream.get_state(), config.to_dict())


class Clock:
    """Throughput and ETA, skipping the first step (compilation)."""

    def __init__(self, config, first_step: int):
        self.total = config.total_steps
        self.images_per_step = config.batch_size * config.n_dis
        self.start_step = None
        self.start_time = None
        self.first_step = first_step
        self.tty = sys.stderr.isatty()

    def tick(self, step: int) -> None:
        if self.start_step is None and step > self.first_step + 1:
            self.start_step, self.start_time = step, time.perf_counter()
        if self.tty:
            done = (step - self.first_step) / max(self.total - self.first_step, 1)
            bar = "#" * int(30 * done)
            print(f"\r[{bar:<30}] {step}/{self.total}", end="", file=sys.stderr)

    def rates(self, step: int) -> tuple[float, float]:
        """(images per second, seconds left), NaN until measured."""
        if self.start_step is None or step <= self.start_step:
            return float("nan"), float("nan")
        elapsed = time.perf_counter() - self.start_time
        steps_per_s = (step - self.start_step) / elapsed
        return steps_per_s * self.images_per_step, (self.total - step) / steps_per_s


def log_metrics(config, writer, clock, step: int, metrics) -> None:
    metrics = {k: float(v) for k, v in unreplicate(metrics).items()}
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"training diverged: {', '.join(bad)} became NaN or Inf by step {step} "
            f"(checked every log_every={config.log_every} steps); checkpoints "
            f"saved before the divergence are usable"
        )
    images_per_s, eta = clock.rates(step)
    if np.isfinite(images_per_s):  # not measured until compilation is over
        metrics["images_per_s"] = images_per_s
    writer.write_scalars(step, metrics)
    line = (
        f"step {step}/{config.total_steps} | d_loss {metrics['d_loss']:.4f} "
        f"g_loss {metrics['g_loss']:.4f} | D(real) {metrics['d_real']:+.3f} "
        f"D(fake) {metrics['d_fake']:+.3f}"
    )
    if "sigma_min" in metrics:
        line += f" | sigma {metrics['sigma_min']:.3f}-{metrics['sigma_max']:.3f}"
    if np.isfinite(images_per_s):
        line += f" | {images_per_s:,.0f} img/s | ETA {_duration(eta)}"
    if clock.tty:
        print(file=sys.stderr)
    writers.console(line)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _sample_params(state: train.TrainState) -> tuple[Any, Any]:
    g = state.g_ema_params if state.g_ema_params is not None else state.g_params
    return unreplicate(g), unreplicate(state.g_batch_stats)


def write_samples(config, trainer, writer, state, step: int) -> None:
    if not writer.enabled:
        return
    g_params, batch_stats = _sample_params(state)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    sample = trainer.sample
    if config.model.name == "mlp":
        z = jax.random.normal(key, (NUM_POINTS, trainer.z_dim))
        points = np.asarray(sample(g_params, batch_stats, z))
        scores = toy.mode_stats(points, config.dataset.name)
        writer.write_scalars(step, {f"toy/{k}": v for k, v in scores.items()})
        writer.write_image(step, images.scatter_image(points, _centers(config)))
        writers.console(
            f"step {step}: {scores['modes']}/{scores['num_modes']} modes covered, "
            f"{scores['high_quality']:.1%} high-quality samples"
        )
        return
    z = jax.random.normal(key, (NUM_SAMPLES, trainer.z_dim))
    labels = None
    if trainer.num_classes:
        labels = jnp.arange(NUM_SAMPLES) % trainer.num_classes
    fake = np.asarray(sample(g_params, batch_stats, z, labels))
    scale = max(1, 32 // fake.shape[1])  # small images are hard to see
    writer.write_image(step, images.image_grid(fake, ncol=8, scale=scale))
    writer.flush()


class Scorer:
    """Evaluation during training, and the best checkpoint by its score.

    Only process 0 scores; the decision to save a new best checkpoint is then
    shared, because every process takes part in saving one.
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.evaluator = None
        if jax.process_index() == 0:
            self.evaluator = evaluator.Evaluator(config)
            # Fail now, not after hours of training, when scoring cannot work.
            errors = self.evaluator.prepare()
            if errors:
                raise evaluator.EvaluationError(errors)
        self.best = records.Best(workdir, config.eval.best_metric)
        self.ckpt = checkpoints.Checkpointer(workdir, keep=1, name="best")

    def score(self, trainer, writer, state, stream, step: int) -> None:
        is_best = False
        if self.evaluator is not None:
            g_params, batch_stats, generator = _eval_params(self.config, state)

            def generate(z, labels):
                y = None if labels is None else jnp.asarray(labels)
                out = np.asarray(trainer.sample(g_params, batch_stats, z, y))
                return out if self.config.model.name == "mlp" else images.to_uint8(out)

            record = self.evaluator.evaluate(generate, step, generator)
            records.write(self.workdir, record)
            writer.write_scalars(step, records.scalars(record))
            writers.console(evaluator.summary(record))
            is_best = self.best.update(record)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            is_best = bool(multihost_utils.broadcast_one_to_all(np.int32(is_best)))
        if is_best:
            save_checkpoint(self.config, self.ckpt, state, stream)

    def close(self) -> None:
        self.ckpt.wait()
        self.ckpt.close()


def _eval_params(config, state) -> tuple[Any, Any, str]:
    """The generator weights ``config.eval.generator`` asks for, and their name."""
    use_ema = config.eval.generator == "ema" or (
        not config.eval.generator and state.g_ema_params is not None
    )
    g = state.g_ema_params if use_ema else state.g_params
    return (
        unreplicate(g),
        unreplicate(state.g_batch_stats),
        "ema" if use_ema else "raw",
    )


def _centers(config) -> np.ndarray:
    return data.embedded.mixture_centers(config.dataset.name)
