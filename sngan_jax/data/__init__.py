"""Training data, chosen by ``config.dataset.name``.

Every source becomes a stream of global batches (see ``stream.py``): dicts with
``images`` (uint8 ``(B, H, W, C)``, or float32 points ``(B, 2)`` for the 2-D
mixtures) and, for labelled data, ``labels`` (int32 ``(B,)``). Images stay
uint8 on the host; ``to_model_input`` maps them to [-1, 1] on the device, and
``random_flip`` mirrors them there.

Sources: the embedded ``digits``, ``ring2d`` and ``grid2d``; ``image_folder``
(``dataset.path``); and any image data set that tensorflow-datasets knows, by
name (``cifar10``, ``stl10``, ``imagenet2012``, ``celeb_a``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sngan_jax.data import embedded
from sngan_jax.data.stream import ArraySource, SamplerStream, ShuffledStream

EMBEDDED = ("digits", "ring2d", "grid2d")
MIXTURES = ("ring2d", "grid2d")


class DataError(ValueError):
    """A data set cannot be read; the message says what to do."""


class DataInfo(NamedTuple):
    """What the model must match: ``kind`` (images or points), shape, classes."""

    kind: str
    shape: tuple[int, ...]
    num_classes: int


def create(
    dataset: Mapping[str, Any],
    global_batch: int,
    seed: int,
    *,
    image_size: int = 0,
    channels: int = 3,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[ShuffledStream | SamplerStream, DataInfo]:
    """The stream of global batches for ``config.dataset``, sliced for a process.

    Images from folders and tensorflow-datasets are resized and center-cropped
    to ``image_size``; the embedded digits keep their 8x8.
    """
    name = dataset["name"]
    where = dict(process_index=process_index, process_count=process_count)
    if name in MIXTURES:

        def sample(num, rng):
            return embedded.sample_mixture(name, num, rng)

        return SamplerStream(sample, global_batch, seed, **where), DataInfo(
            "points", (2,), 0
        )
    source, num_classes = image_source(dataset, image_size, channels)
    info = DataInfo("images", source.get_batch([0])["images"].shape[1:], num_classes)
    return ShuffledStream(source, global_batch, seed, **where), info


def image_source(dataset: Mapping[str, Any], image_size: int, channels: int):
    """``(source, num_classes)``: random access to the images of ``dataset``."""
    name = dataset["name"]
    if name == "digits":
        images, labels = embedded.load_digits()
        return ArraySource({"images": images, "labels": labels}), 10
    if name == "image_folder":
        from sngan_jax.data import folder

        if not dataset["path"]:
            raise DataError("dataset.name='image_folder' needs dataset.path=<dir>")
        images, labels, classes = folder.load_image_folder(
            dataset["path"], image_size, channels, dataset["cache_dir"] or None
        )
        arrays = {"images": images, "labels": labels} if classes else {"images": images}
        return ArraySource(arrays), len(classes)
    from sngan_jax.data import tfds_source

    source = tfds_source.open_source(dataset, image_size)
    return source, source.num_classes


def to_model_input(images: jax.Array) -> jax.Array:
    """uint8 images to float32 in [-1, 1]; float data (points) passes through."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def random_flip(images: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors ``images (N, H, W, C)`` left-right where ``flip (N,)`` is true."""
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
