"""What a run reports while it trains: metric lines, samples and scores.

``check_metrics`` and ``log_metrics`` read a step's metrics from the devices,
stop on NaN or Inf (``Diverged``) and write the log line; ``write_samples``
draws the sample grid (or, for the 2-D mixtures, scores and plots points);
``Scorer`` evaluates during training and keeps the best checkpoint.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sngan_jax import checkpoints, data, images, train, writers
from sngan_jax.evaluation import evaluator, records, toy
from sngan_jax.train import unreplicate

NUM_SAMPLES = 64  # images in a sample grid
NUM_POINTS = 2500  # points scored and drawn for the 2-D mixtures
# Step metrics that flag non-finite weights (1.0 while all are finite); they
# are checked, not logged.
FINITE_FLAGS = {"g_params_finite": "g_params", "d_params_finite": "d_params"}


class Diverged(FloatingPointError):
    """A loss or the weights became NaN or Inf at ``step``."""

    def __init__(self, message: str, step: int, quantities: list[str]):
        super().__init__(message)
        self.step = step
        self.quantities = quantities


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


def check_metrics(config, writer, clock, step: int, metrics) -> None:
    """Reads one step's metrics: ``Diverged`` on NaN or Inf, a log line at log steps."""
    scalars = _host_scalars(metrics)
    _check_finite(step, scalars)
    if step % config.log_every == 0:
        _log(config, writer, clock, step, scalars)


def log_metrics(config, writer, clock, step: int, metrics) -> None:
    """Reads, checks (``Diverged``) and logs one step's metrics."""
    scalars = _host_scalars(metrics)
    _check_finite(step, scalars)
    _log(config, writer, clock, step, scalars)


def _host_scalars(metrics) -> dict[str, float]:
    # One transfer for all of them: this runs every step.
    local = jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()})
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in local.items()}


def _check_finite(step: int, scalars: dict[str, float]) -> None:
    bad = [
        f"{FINITE_FLAGS[k]} hold NaN or Inf"
        for k, v in scalars.items()
        if k in FINITE_FLAGS and v != 1.0
    ]
    bad += [
        f"{k} is {'NaN' if np.isnan(v) else 'Inf'}"
        for k, v in scalars.items()
        if k not in FINITE_FLAGS and not np.isfinite(v)
    ]
    if bad:
        message = f"training diverged at step {step}: {', '.join(bad)}"
        raise Diverged(message, step, bad)


def _log(config, writer, clock, step: int, scalars: dict[str, float]) -> None:
    metrics = {k: v for k, v in scalars.items() if k not in FINITE_FLAGS}
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
            checkpoints.save_replicated(self.config, self.ckpt, state, stream)

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
