"""Config checks that run before anything is compiled or written."""

from __future__ import annotations

import ml_collections

from sngan_jax import data, layers, losses, models


class ConfigError(ValueError):
    """The config cannot work; the message says which field and what to do."""


def check(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ``ConfigError`` for a config that cannot run, before any data is read."""
    _check_numbers(config, device_count)
    _check_names(config)
    check_eval(config)


def check_eval(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` for ``config.eval`` fields that cannot work."""
    from sngan_jax.evaluation import evaluator, protocol

    if config.eval.protocol not in protocol.PROTOCOLS:
        raise ConfigError(
            f"unknown eval.protocol {config.eval.protocol!r}; "
            f"choose one of {sorted(protocol.PROTOCOLS)}"
        )
    try:
        evaluator.metric_families(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.eval.generator not in ("", "ema", "raw"):
        raise ConfigError(
            f"eval.generator must be ema, raw or empty, got {config.eval.generator!r}"
        )
    if config.eval.generator == "ema" and not config.ema_decay:
        raise ConfigError(
            "eval.generator='ema' but the run keeps no moving average (ema_decay=0); "
            "set ema_decay (e.g. 0.999) or eval.generator='raw'"
        )
    if config.eval_every < 0 or config.eval.batch_per_device < 1:
        raise ConfigError("eval_every must be >= 0 and eval.batch_per_device >= 1")


def _check_numbers(config: ml_collections.ConfigDict, device_count: int) -> None:
    if config.batch_size % device_count:
        raise ConfigError(
            f"batch_size={config.batch_size} (the global batch) is not divisible by "
            f"the {device_count} devices of this run; pick a multiple of "
            f"{device_count}, for example --config.batch_size="
            f"{max(device_count, config.batch_size // device_count * device_count)}"
        )
    for field in ("total_steps", "n_dis", "batch_size"):
        if config[field] < 1:
            raise ConfigError(f"{field} must be at least 1, got {config[field]}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")


def _check_names(config: ml_collections.ConfigDict) -> None:
    if config.model.name not in models.MODELS:
        raise ConfigError(
            f"unknown model.name {config.model.name!r}; choose one of {models.MODELS}"
        )
    if config.model.d_norm not in layers.NORMS:
        raise ConfigError(
            f"unknown model.d_norm {config.model.d_norm!r}; "
            f"choose one of {layers.NORMS}"
        )
    if config.loss.name not in losses.LOSSES:
        raise ConfigError(
            f"unknown loss.name {config.loss.name!r}; "
            f"choose one of {sorted(losses.LOSSES)}"
        )


def check_data(config: ml_collections.ConfigDict, info: data.DataInfo) -> None:
    """Raises ``ConfigError`` when the model cannot train on the data."""
    model = config.model
    if info.kind == "points":
        if model.name != "mlp":
            raise ConfigError(
                f"data set {config.dataset.name!r} is 2-D points; it needs "
                f"model.name='mlp', not {model.name!r}"
            )
    else:
        expected = (model.image_size, model.image_size, model.channels)
        if tuple(info.shape) != expected:
            raise ConfigError(
                f"data set {config.dataset.name!r} has images of shape "
                f"{tuple(info.shape)}, but the model is set up for {expected} "
                f"(model.image_size, model.channels)"
            )
    if model.num_classes and not info.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} asks for a class-conditional "
            f"model, but data set {config.dataset.name!r} has no labels"
        )
    if model.num_classes and model.num_classes != info.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes}, but data set "
            f"{config.dataset.name!r} has {info.num_classes} classes"
        )


# Fields that may differ when a run resumes: schedules of logging, saving and
# evaluation, the length of the run, and everything under eval.
RESUMABLE_CHANGES = (
    "total_steps",
    "eval_every",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "allow_config_change",
)


def check_resume(config: ml_collections.ConfigDict, saved: dict) -> list[str]:
    """Compares a config with the one a checkpoint was trained with.

    Returns the differences as ``field: saved -> new`` lines (only those outside
    ``RESUMABLE_CHANGES``); raises ``ConfigError`` when there are any and
    ``config.allow_config_change`` is false.
    """
    diffs = [
        f"{key}: {old!r} -> {new!r}"
        for key, old, new in _differences(saved, config.to_dict())
        if key not in RESUMABLE_CHANGES and not key.startswith("eval.")
    ]
    if diffs and not config.allow_config_change:
        raise ConfigError(
            "the workdir holds a run trained with another config:\n  "
            + "\n  ".join(diffs)
            + "\nresume with the same config, pick another --workdir, or pass "
            "--config.allow_config_change=True to resume anyway"
        )
    return diffs


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and tuple(a) == b):
            out.append((prefix + key, a, b))
    return out
