"""Config checks that run before anything is compiled or written.

``check`` compares a config with the schema of ``configs/common.py`` (field
names and types) and checks the values against each other and the devices;
``check_data`` against the data set; ``check_resume`` against a checkpoint's
config. ``parse_flags`` makes a bad command line one ``error:`` line.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any

import ml_collections
from absl import flags

from sngan_jax import data, losses, models, norms
from sngan_jax.models import dcgan, resnet, small


class ConfigError(ValueError):
    """The config cannot work; the message says which field and what to do."""


def check(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ``ConfigError`` for a config that cannot run, before any data is read."""
    check_fields(config)
    _check_numbers(config, device_count)
    _check_names(config)
    _check_model(config)
    check_eval(config)


def schema() -> dict[str, Any]:
    """Every config field as ``{"dotted.path": default}`` (``configs/common.py``)."""
    from configs import common

    return _leaves(common.base().to_dict())


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` for a field the schema lacks, misses, or mistypes.

    A config file that sets ``config.optimizer.learing_rate`` adds a new field
    (ml_collections allows it) and would train with the default ``lr``; this
    check names the field and the closest known ones instead.
    """
    expected = schema()
    given = _leaves(config.to_dict())
    for path in given:
        if path not in expected:
            raise ConfigError(unknown_field(path, expected))
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ConfigError(
            f"the config lacks the fields {missing}; start config files from "
            f"configs.common.base(), which sets every field"
        )
    for path, value in given.items():
        default = expected[path]
        if not _same_type(value, default):
            raise ConfigError(
                f"config field {path} must be of type {type(default).__name__}, got "
                f"{value!r} ({type(value).__name__}); e.g. --config.{path}={default!r}"
            )


def unknown_field(path: str, known: dict[str, Any] | None = None) -> str:
    """The error message for a config field ``path`` that does not exist."""
    known = schema() if known is None else known
    if any(k.startswith(path + ".") for k in known):
        fields = sorted(k for k in known if k.startswith(path + "."))
        return (
            f"config field {path} is a group of fields, not a value; set one of "
            f"{', '.join(fields)}"
        )
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (
        f"unknown config field {path}{hint}; fix the name on the command line or "
        f"in the config file (configs/common.py lists every field)"
    )


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same_type(value: Any, default: Any) -> bool:
    # bool is an int to Python, but never a sensible step count or width; an
    # int is a fine float (lr=1).
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


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
    if config.model.d_norm not in norms.NORMS:
        raise ConfigError(
            f"unknown model.d_norm {config.model.d_norm!r}; choose one of {norms.NORMS}"
        )
    if config.loss.name not in losses.LOSSES:
        raise ConfigError(
            f"unknown loss.name {config.loss.name!r}; "
            f"choose one of {sorted(losses.LOSSES)}"
        )


# The image sizes whose layer layouts each model's tables define (the models
# look their sizes up there when they are first called, which is too late).
IMAGE_SIZES = {
    "sndcgan": tuple(sorted(dcgan._BOTTOM)),
    "resnet": tuple(sorted(set(resnet._G_SPECS) & set(resnet._D_SPECS))),
    "small": tuple(sorted(small._STAGES)),
}


def _check_model(config: ml_collections.ConfigDict) -> None:
    model = config.model
    if model.num_classes < 0:
        raise ConfigError(f"model.num_classes must be >= 0, got {model.num_classes}")
    if model.dtype not in models.DTYPES:
        raise ConfigError(
            f"unknown model.dtype {model.dtype!r}; choose one of {models.DTYPES} "
            f"(bfloat16 activations pay off on GPUs and TPUs, not on CPUs)"
        )
    if model.name == "mlp":  # 2-D points: no image size, channels or classes
        return
    sizes = IMAGE_SIZES[model.name]
    if model.image_size not in sizes:
        others = [m for m, s in IMAGE_SIZES.items() if model.image_size in s]
        alternative = f", or model.name={others[0]!r}" if others else ""
        raise ConfigError(
            f"model {model.name!r} is defined for image sizes {list(sizes)}, not "
            f"model.image_size={model.image_size}; set --config.model.image_size "
            f"to one of them (the data is resized to it){alternative}"
        )
    if model.channels not in (1, 3):
        raise ConfigError(
            f"model.channels must be 1 (grey) or 3 (RGB), got {model.channels}"
        )
    if model.name == "resnet" and model.channels != 3:
        raise ConfigError(
            "the ResNet generator makes RGB images: set model.channels=3 (grey "
            "images are converted to RGB) or use model.name='sndcgan'"
        )
    if model.num_classes and model.name != "resnet":
        raise ConfigError(
            f"model {model.name!r} is not class-conditional (only 'resnet' is); "
            f"set model.num_classes=0 or model.name='resnet'"
        )
    if model.name == "resnet" and model.conditioning not in resnet.CONDITIONINGS:
        raise ConfigError(
            f"unknown model.conditioning {model.conditioning!r}; choose one of "
            f"{resnet.CONDITIONINGS}"
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
    elif model.name == "mlp":
        raise ConfigError(
            f"model 'mlp' is for 2-D points, but data set {config.dataset.name!r} "
            f"holds images; pick an image model (small, sndcgan or resnet)"
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
            f"model, but data set {config.dataset.name!r} has no labels; set "
            f"model.num_classes=0, or use labelled data (a tfds split with labels, "
            f"or an image folder with one sub-folder per class)"
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override as one error line.

    Prints ``error: ...`` and exits with status 1 where absl would print a
    traceback (an override of a field the config lacks) or its usage text.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (KeyError, AttributeError) as e:
        # ml_collections raises these, naming only the last part of the path,
        # for an override of a field that the config lacks.
        known = schema()
        unknown = [p for p in _override_paths(argv) if p not in known]
        message = unknown_field(unknown[0], known) if unknown else repr(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _override_paths(argv: list[str]) -> list[str]:
    """Field paths of ``--config.a.b=value`` (or ``--noconfig.a.b``) arguments."""
    paths = []
    for arg in argv[1:]:
        match = re.match(r"-{1,2}(?:no)?config\.([^=\s]+)", arg)
        if match:
            paths.append(match.group(1))
    return paths
