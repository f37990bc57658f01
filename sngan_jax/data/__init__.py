"""Training data, chosen by ``config.dataset.name``.

Every source becomes a stream of global batches (see ``stream.py``): dicts with
``images`` (uint8 ``(B, H, W, C)``, or float32 points ``(B, 2)`` for the 2-D
mixtures) and, for labelled data, ``labels`` (int32 ``(B,)``). Images stay
uint8 on the host; ``to_model_input`` maps them to [-1, 1] on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sngan_jax.data import embedded
from sngan_jax.data.stream import ArrayStream, SamplerStream

EMBEDDED = ("digits", "ring2d", "grid2d")
# Named in configs of the paper's experiments; read through tensorflow-datasets
# or an image folder, which this version does not have yet.
NOT_YET = ("cifar10", "stl10", "imagenet2012", "celeb_a", "image_folder")


class DataError(ValueError):
    """A data set cannot be read; the message says what to do."""


def create(
    dataset: Mapping[str, Any],
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> ArrayStream | SamplerStream:
    """The stream of global batches for ``config.dataset``, sliced for a process."""
    name = dataset["name"]
    where = dict(process_index=process_index, process_count=process_count)
    if name in ("ring2d", "grid2d"):
        sample = lambda num, rng: embedded.sample_mixture(name, num, rng)  # noqa: E731
        return SamplerStream(sample, global_batch, seed, **where)
    if name == "digits":
        images, labels = embedded.load_digits()
        return ArrayStream(
            {"images": images, "labels": labels}, global_batch, seed, **where
        )
    if name in NOT_YET:
        raise DataError(
            f"the data set {name!r} needs the tensorflow-datasets and image-folder "
            f"readers, which this version of sngan-jax does not have yet; the "
            f"embedded data sets {EMBEDDED} work offline"
        )
    raise DataError(f"unknown data set {name!r}; the embedded ones are {EMBEDDED}")


def describe(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """Shape facts of a data set without reading it: kind, shape, classes."""
    name = dataset["name"]
    if name in ("ring2d", "grid2d"):
        return {"kind": "points", "shape": (2,), "num_classes": 0}
    if name == "digits":
        return {"kind": "images", "shape": (8, 8, 1), "num_classes": 10}
    create(dataset, 1, 0)  # raises the informative error
    raise AssertionError("unreachable")


def to_model_input(images: jax.Array) -> jax.Array:
    """uint8 images to float32 in [-1, 1]; float data (points) passes through."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)
