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
import threading
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from sngan_jax import checkpoints, data, optim, reports, train, validate, writers
from sngan_jax.reports import Diverged  # raised by train_and_evaluate


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
        scorer = reports.Scorer(config, workdir) if config.eval_every else None
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
    scorer: reports.Scorer | None
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
    state = train.to_devices(state, run.devices)
    first_step = int(state.step[0])
    saved = first_step  # the step of the newest checkpoint of this state's history
    clock = reports.Clock(config, first_step)
    pending = None  # (step, metrics) dispatched but not read yet
    for step in range(first_step + 1, config.total_steps + 1):
        if run.stop.signal:
            break
        batches = [next(run.stream) for _ in range(config.n_dis)]
        state, metrics = p_step(state, train.shard_batches(batches, num_local))
        if pending is not None:
            reports.check_metrics(config, run.writer, clock, *pending)
        pending = (step, metrics)
        clock.tick(step)
        if _writes_at(config, step):
            # Samples, checkpoints and scores wait for the state anyway; its
            # metrics are read first so that nothing diverged gets written.
            reports.check_metrics(config, run.writer, clock, *pending)
            pending = None
            saved = _write(run, state, step) or saved
    if pending is not None:
        reports.check_metrics(config, run.writer, clock, *pending)
    if run.stop.signal:
        _save_and_stop(run, state, saved)
    return train.unreplicate(state)


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
        checkpoints.save_replicated(config, run.ckpt, state, run.stream)
        saved = step
    if step % config.sample_every == 0 or last:
        reports.write_samples(config, run.trainer, run.writer, state, step)
    if run.scorer and (step % config.eval_every == 0 or last):
        run.scorer.score(run.trainer, run.writer, state, run.stream, step)
    return saved


def _save_and_stop(run: _Run, state, saved: int) -> None:
    step = int(train.unreplicate(state.step))
    if step > saved:
        checkpoints.save_replicated(run.config, run.ckpt, state, run.stream)
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
