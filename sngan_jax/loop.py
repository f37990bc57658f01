"""The training loop: ``train_and_evaluate(config, workdir)``.

It resumes from the workdir's latest readable checkpoint when there is one,
feeds ``n_dis`` real batches per step to the pmapped step function, reads each
step's metrics after the next step is dispatched (so the devices never wait
for logging), and writes metrics, samples and checkpoints on their schedules.
Every ``eval_every`` steps it scores the generator (``config.eval``) and keeps
the checkpoint with the best score in ``<workdir>/best``.

Every step's losses and a finiteness flag of the weights are checked: a NaN or
Inf stops training (``Diverged``), or rolls back to the last checkpoint with a
lower learning rate when ``divergence_rollbacks`` allows. A step is checked
before anything of it is written, so no checkpoint holds a diverged state.
SIGTERM and SIGINT stop training after the step in flight with a checkpoint of
that step (``Interrupted``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sngan_jax import checkpoints, data, images, optim, train, validate, writers
from sngan_jax.evaluation import evaluator, records, toy

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


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped training; the message says what was saved."""


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    devices: Sequence[jax.Device] | None = None,
) -> train.TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state on the host.

    ``devices`` restricts a single-process run to some local devices (tests
    use it to compare device counts); by default every device takes part.
    Raises ``Diverged`` on NaN or Inf, ``Interrupted`` after SIGTERM or SIGINT
    (with a checkpoint of the last step), ``checkpoints.CheckpointError`` when
    the workdir or a checkpoint cannot be written.
    """
    if devices is not None and jax.process_count() > 1:
        raise ValueError("devices= is for single-process runs; use every device")
    num_devices = len(devices) if devices else jax.device_count()
    validate.check(config, num_devices)
    stream, info = open_data(config)
    validate.check_data(config, info)
    checkpoints.check_writable(workdir)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    check_resume(config, ckpt)
    is_main = jax.process_index() == 0
    write_config(config, workdir)  # only once the config has passed every check

    with StopRequest() as stop:
        scorer = Scorer(config, workdir) if config.eval_every else None
        trainer = train.Trainer(config)
        writer = writers.MetricWriter(workdir, enabled=is_main)
        run = _Run(
            config,
            trainer,
            stream,
            ckpt,
            writer,
            scorer,
            devices,
            stop,
            fresh=jax.device_get(trainer.init_state(config.seed)),
            data_start=stream.get_state(),
        )
        try:
            state = _restore(run)
            if int(state.step):
                writers.console(f"resumed from the checkpoint at step {state.step}")
            state = _train(run, state)
        except OSError as e:  # metrics, samples or scores: a full disk, say
            raise run.ckpt.write_error(f"{e.strerror or e} ({e.filename})") from e
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
    latest = ckpt.latest_config()
    if latest is None:
        return
    for line in validate.check_resume(config, latest[1]):
        writers.console(f"warning: resuming with a changed config, {line}")


@dataclasses.dataclass
class _Run:
    """What the parts of one training run share."""

    config: ml_collections.ConfigDict
    trainer: train.Trainer
    stream: Any
    ckpt: checkpoints.Checkpointer
    writer: writers.MetricWriter
    scorer: Scorer | None
    devices: Sequence[jax.Device] | None
    stop: StopRequest
    fresh: train.TrainState  # the initial state on the host
    data_start: dict  # the stream's position at step 0


def _restore(run: _Run) -> train.TrainState:
    """The latest readable checkpoint's state (data position set), or a fresh one."""
    restored = run.ckpt.restore_latest(template=run.fresh)
    if restored is None:
        run.stream.set_state(run.data_start)
        run.writer.truncate_after(0)
        return run.fresh
    step, state, data_state, saved_config = restored
    run.stream.set_state(data_state)
    run.writer.truncate_after(step)
    return _apply_changed_hyperparams(run.config, saved_config, state)


def _apply_changed_hyperparams(config, saved_config: dict, state):
    """``state`` with the Adam settings that ``config`` changed since the checkpoint.

    They live in the optimizer state, so a resumed run would keep the old ones;
    only those the user changed (``allow_config_change``) are replaced, so that
    a learning rate lowered by a roll-back stays lowered.
    """
    saved = saved_config.get("optimizer", {})
    changed = {
        name: config.optimizer[name]
        for name in optim.HYPERPARAMS
        if name in saved and saved[name] != config.optimizer[name]
    }
    if not changed:
        return state
    return state.replace(
        g_opt_state=optim.set_hyperparams(state.g_opt_state, changed),
        d_opt_state=optim.set_hyperparams(state.d_opt_state, changed),
    )


def _train(run: _Run, state: train.TrainState) -> train.TrainState:
    """Trains to ``total_steps``; on divergence rolls back as the config allows."""
    config = run.config
    p_step = train.pmap_train_step(run.trainer, run.devices)
    lrs = _learning_rates(state)
    rollbacks = 0
    while True:
        try:
            return _steps(run, p_step, state)
        except Diverged as e:
            if rollbacks >= config.divergence_rollbacks:
                raise _final(run, e, rollbacks) from None
            rollbacks += 1
            state, lrs = _roll_back(run, e, lrs, rollbacks)


def _steps(run: _Run, p_step, state: train.TrainState) -> train.TrainState:
    """The loop proper, from ``state`` (on the host) to ``total_steps``."""
    config = run.config
    num_local = len(run.devices) if run.devices else jax.local_device_count()
    state = to_devices(state, run.devices)
    first_step = int(state.step[0])
    saved = first_step  # the step of the newest checkpoint of this state's history
    clock = Clock(config, first_step)
    pending = None  # (step, metrics) dispatched but not read yet
    for step in range(first_step + 1, config.total_steps + 1):
        if run.stop.signal:
            break
        batches = [next(run.stream) for _ in range(config.n_dis)]
        state, metrics = p_step(state, train.shard_batches(batches, num_local))
        if pending is not None:
            check_metrics(config, run.writer, clock, *pending)
        pending = (step, metrics)
        clock.tick(step)
        if _writes_at(config, step):
            # Samples, checkpoints and scores wait for the state anyway; its
            # metrics are read first so that nothing diverged gets written.
            check_metrics(config, run.writer, clock, *pending)
            pending = None
            saved = _write(run, state, step) or saved
    if pending is not None:
        check_metrics(config, run.writer, clock, *pending)
    if run.stop.signal:
        _save_and_stop(run, state, saved)
    return unreplicate(state)


def _writes_at(config, step: int) -> bool:
    return (
        step % config.sample_every == 0
        or step % config.checkpoint_every == 0
        or (config.eval_every and step % config.eval_every == 0)
        or step == config.total_steps
    )


def _write(run: _Run, state, step: int) -> int | None:
    """Samples, a checkpoint and a score as scheduled; the step if it was saved."""
    config, last = run.config, step == run.config.total_steps
    saved = None
    if step % config.checkpoint_every == 0 or last:
        # First: saving waits for the previous save, whose failure (a full
        # disk) is best reported before anything else tries to write.
        save_checkpoint(config, run.ckpt, state, run.stream)
        saved = step
    if step % config.sample_every == 0 or last:
        write_samples(config, run.trainer, run.writer, state, step)
    if run.scorer and (step % config.eval_every == 0 or last):
        run.scorer.score(run.trainer, run.writer, state, run.stream, step)
    return saved


def _save_and_stop(run: _Run, state, saved: int) -> None:
    step = int(unreplicate(state.step))
    if step > saved:
        save_checkpoint(run.config, run.ckpt, state, run.stream)
    run.ckpt.wait()
    if step == 0:
        raise Interrupted(f"stopped by {run.stop.signal} before the first step")
    raise Interrupted(
        f"stopped by {run.stop.signal} at step {step}; its checkpoint is in "
        f"{run.ckpt.directory}. Run the same command to resume"
    )


def _learning_rates(state: train.TrainState) -> dict[str, float]:
    return {
        "g": float(optim.hyperparams(state.g_opt_state)["lr"]),
        "d": float(optim.hyperparams(state.d_opt_state)["lr"]),
    }


def _roll_back(run: _Run, error: Diverged, lrs: dict, rollback: int):
    """The last checkpoint's state with a lower learning rate, and that rate.

    The rate is lowered from the lower of the checkpoint's and the diverged
    run's, so a second roll-back to the same checkpoint lowers it again.
    """
    run.ckpt.wait()
    state = _restore(run)
    saved = _learning_rates(state)
    factor = run.config.divergence_lr_factor
    lrs = {net: min(lr, saved[net]) * factor for net, lr in lrs.items()}
    state = state.replace(
        g_opt_state=optim.set_hyperparams(state.g_opt_state, {"lr": lrs["g"]}),
        d_opt_state=optim.set_hyperparams(state.d_opt_state, {"lr": lrs["d"]}),
    )
    writers.console(
        f"warning: {error}; rolled back to step {int(state.step)} with the "
        f"learning rate lowered to {lrs['d']:.3g} (roll-back {rollback} of "
        f"{run.config.divergence_rollbacks})"
    )
    return state, lrs


def _final(run: _Run, error: Diverged, rollbacks: int) -> Diverged:
    """The error that ends a diverged run: what happened and what is kept."""
    latest = run.ckpt.latest_step()
    kept = (
        f"the last checkpoint, step {latest}, is intact (nothing after the "
        f"divergence was saved)"
        if latest is not None
        else "no checkpoint had been written"
    )
    tried = f" after {rollbacks} roll-back(s)" if rollbacks else ""
    advice = (
        "lower optimizer.lr"
        if rollbacks
        else "lower optimizer.lr, or set divergence_rollbacks > 0 to roll back "
        "and retry with a lower learning rate"
    )
    return Diverged(f"{error}{tried}; {kept}; {advice}", error.step, error.quantities)


class StopRequest:
    """SIGTERM and SIGINT ask the loop to stop after the step in flight.

    A cluster that preempts a job sends SIGTERM and waits a grace period
    before SIGKILL; Ctrl-C sends SIGINT. ``signal`` holds the name of the first
    one received. A second signal ends the process at once (the default
    action), for whoever will not wait for the checkpoint. Handlers are set
    only in the main thread (the only one that may set them) of a
    single-process run: with several processes all must stop at the same step,
    which a signal to each cannot promise.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            if jax.process_count() == 1:
                for signum in self.SIGNALS:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signal.Signals(signum).name


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
    """Starts saving the (replicated) state and the stream's position."""
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
