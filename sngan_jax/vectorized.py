"""Many sweep points in one compiled program: ``train_points(configs, workdirs)``.

Points whose configs differ only in Adam's hyperparameters (``optimizer.lr``,
``b1``, ``b2``, ``eps``) share the networks, the data and every random draw;
only the optimizer state differs, and there the hyperparameters are arrays
(``optim.create`` injects them). So their train states are stacked along a
leading sweep axis and the step is vmapped over it inside pmap: the K points
train on the same batches in one program, and each point's results equal
those of training it alone up to float rounding (a test checks this).

Each point still gets its own workdir with its own metrics, samples and
checkpoints, exactly as a run of ``loop.train_and_evaluate`` would write
them, so it resumes, loads and evaluates like any run. A point that diverges
is marked so and dropped from logging and saving; the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sngan_jax import checkpoints, data, loop, optim, reports, train, validate, writers

VECTOR_FIELDS = tuple(f"optimizer.{name}" for name in optim.HYPERPARAMS)
# Config fields whose value does not change what is computed.
NEUTRAL_FIELDS = ("allow_config_change",)


def can_vectorize(configs: Sequence[ml_collections.ConfigDict]) -> bool:
    """True when the configs differ in nothing but ``VECTOR_FIELDS``."""
    ignored = set(VECTOR_FIELDS) | set(NEUTRAL_FIELDS)
    first = _flat(configs[0].to_dict())
    for config in configs[1:]:
        other = _flat(config.to_dict())
        keys = (set(first) | set(other)) - ignored
        if any(first.get(k) != other.get(k) for k in keys):
            return False
    return True


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def train_points(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, dict[str, Any]]:
    """Trains the points together; ``{workdir: {"status", "step", "message"}}``.

    Status is ``finished`` or ``diverged``. Points resume together from their
    checkpoints, which must be at the same step (they are, when they were
    trained together).
    """
    if not can_vectorize(configs):
        raise ValueError(
            f"these points differ in more than {VECTOR_FIELDS}; train them one by one"
        )
    config = configs[0]
    num_devices = len(devices) if devices else jax.device_count()
    for c in configs:
        validate.check(c, num_devices)
    stream, info = loop.open_data(config)
    points = [_Point(c, w, info) for c, w in zip(configs, workdirs, strict=True)]
    trainer = train.Trainer(config)
    state = _stacked_state(trainer, points, stream)
    try:
        _run(config, trainer, points, state, stream, devices)
    finally:
        for point in points:
            point.close()
    return {p.workdir: p.result() for p in points}


class _Point:
    """One sweep point's config, workdir, writer, checkpoints and status."""

    def __init__(self, config, workdir: str, info: data.DataInfo):
        validate.check_data(config, info)
        self.config, self.workdir = config, workdir
        self.ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
        loop.check_resume(config, self.ckpt)
        loop.write_config(config, workdir)
        self.writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
        self.scorer = reports.Scorer(config, workdir) if config.eval_every else None
        self.diverged: tuple[int, str] | None = None
        self.step = 0

    def result(self) -> dict[str, Any]:
        if self.diverged:
            step, message = self.diverged
            return {"status": "diverged", "step": step, "message": message}
        return {"status": "finished", "step": self.step, "message": ""}

    def close(self) -> None:
        self.ckpt.wait()
        if self.scorer is not None:
            self.scorer.close()
        self.writer.close()


def _stacked_state(trainer, points: list[_Point], stream) -> Any:
    """The points' states stacked on a leading axis, fresh or from checkpoints."""
    fresh = jax.device_get(trainer.init_state(trainer.config.seed))
    steps = {p.ckpt.latest_step() for p in points}
    if len(steps) > 1:
        raise ValueError(
            f"the points' checkpoints are at different steps {sorted(steps)}; "
            "resume them one by one"
        )
    (step,) = steps
    states = []
    for point in points:
        state = fresh
        if step is not None:
            state, data_state, _ = point.ckpt.restore(step, template=fresh)
            stream.set_state(data_state)  # the same for every point
            point.writer.truncate_after(step)
        states.append(_with_hyperparams(state, point.config.optimizer))
    if step is not None:
        writers.console(f"resumed {len(points)} points from step {step}")
    return jax.tree.map(lambda *xs: np.stack(xs), *states)


def _with_hyperparams(state: train.TrainState, opt) -> train.TrainState:
    values = {name: opt[name] for name in optim.HYPERPARAMS}
    return state.replace(
        g_opt_state=optim.set_hyperparams(state.g_opt_state, values),
        d_opt_state=optim.set_hyperparams(state.d_opt_state, values),
    )


def _run(config, trainer, points, state, stream, devices) -> None:
    p_step = train.pmap_train_step(trainer, devices, vectorized=True)
    num_local = len(devices) if devices else jax.local_device_count()
    state = train.to_devices(state, devices)
    first_step = int(train.unreplicate(state.step)[0])
    clock = reports.Clock(config, first_step)
    pending = None
    for step in range(first_step + 1, config.total_steps + 1):
        batches = [next(stream) for _ in range(config.n_dis)]
        state, metrics = p_step(state, train.shard_batches(batches, num_local))
        if pending is not None:
            _log(points, clock, *pending)
        pending = (step, metrics) if step % config.log_every == 0 else None
        clock.tick(step)
        _per_point(config, trainer, points, state, stream, step)
    if pending is not None:
        _log(points, clock, *pending)


def _view(tree: Any, k: int) -> Any:
    """Point ``k``'s slice of a replicated, stacked pytree (still replicated)."""
    return jax.tree.map(lambda x: x[:, k], tree)


def _log(points, clock, step: int, metrics) -> None:
    for k, point in enumerate(points):
        if point.diverged:
            continue
        try:
            reports.log_metrics(
                point.config, point.writer, clock, step, _view(metrics, k)
            )
        except FloatingPointError as e:
            point.diverged = (step, str(e))
            writers.console(f"{point.workdir}: diverged at step {step}")


def _per_point(config, trainer, points, state, stream, step: int) -> None:
    last = step == config.total_steps
    sample = step % config.sample_every == 0 or last
    save = step % config.checkpoint_every == 0 or last
    score = config.eval_every and (step % config.eval_every == 0 or last)
    for k, point in enumerate(points):
        if point.diverged or not (sample or save or score):
            continue
        view = _view(state, k)
        point.step = step
        if sample:
            reports.write_samples(point.config, trainer, point.writer, view, step)
        if save:
            checkpoints.save_replicated(point.config, point.ckpt, view, stream)
        if score:
            point.scorer.score(trainer, point.writer, view, stream, step)
