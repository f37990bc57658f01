"""Classifier-based scores for the embedded 8x8 digits, with no download.

Inception features mean little for 8x8 grey digits, so runs on the digits
are scored with a small classifier trained on the digits themselves: the FID
and KID of its 128-d penultimate features, the Inception-Score formula on its
10-way logits, and how many of the ten digit classes the samples cover.

The classifier is trained once, on the CPU (so every machine gets the same
one), on a fixed 1,497 of the 1,797 digits, and its accuracy on the other 300
is recorded with every score. It is cached under ``cache_dir("digits")``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sngan_jax import files
from sngan_jax.data import embedded
from sngan_jax.evaluation import cache_dir

VERSION = 1  # bump when the network or its training changes
NUM_HELD_OUT = 300
TRAIN_STEPS = 1500
BATCH = 128
LEARNING_RATE = 1e-3
MIN_FRACTION = 0.01  # a class is covered when >= 1% of samples are classified as it


class Classifier(nn.Module):
    """Two convolutions and two dense layers; features are the 128-d hidden layer."""

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images.astype(jnp.float32) / 127.5 - 1.0
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
        features = nn.relu(nn.Dense(128)(x.reshape(len(x), -1)))
        return {"pool": features, "logits": nn.Dense(10)(features)}


def apply(params: Any, images: jax.Array) -> dict[str, jax.Array]:
    """``{"pool": (N, 128), "logits": (N, 10)}`` of uint8 digits ``(N, 8, 8, 1)``."""
    return Classifier().apply({"params": params}, images)


def load_classifier() -> tuple[Any, dict[str, Any]]:
    """The trained classifier's params and its description (accuracy, checksum).

    Trains it (about ten seconds on a CPU) the first time and caches it.
    """
    path = os.path.join(cache_dir("digits"), f"classifier_v{VERSION}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            arrays = dict(f)
        accuracy = float(arrays.pop("held_out_accuracy"))
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            params, accuracy = _train()
        arrays = {"/".join(k): np.asarray(v) for k, v in _flatten(params).items()}
        files.save_npz(path, {**arrays, "held_out_accuracy": np.float64(accuracy)})
    params = traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in arrays.items()}
    )
    info = {
        "classifier": f"digits-cnn-v{VERSION}",
        "sha256": _checksum(arrays),
        "held_out_accuracy": accuracy,
    }
    return params, info


def split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The fixed (train, held-out) split of ``(images, labels)``."""
    images, labels = embedded.load_digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, held = order[NUM_HELD_OUT:], order[:NUM_HELD_OUT]
    return (images[train], labels[train]), (images[held], labels[held])


def _train() -> tuple[Any, float]:
    (images, labels), (held_images, held_labels) = split()
    model = Classifier()
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    tx = optax.adam(LEARNING_RATE)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(TRAIN_STEPS):
        batch = rng.choice(len(images), BATCH, replace=False)
        params, opt_state = step(params, opt_state, images[batch], labels[batch])
    logits = model.apply({"params": params}, held_images)["logits"]
    accuracy = float(np.mean(np.argmax(logits, -1) == held_labels))
    return jax.device_get(params), accuracy


def class_coverage(logits: np.ndarray) -> tuple[int, np.ndarray]:
    """Classes covered by samples with ``logits (N, 10)``, and the class shares."""
    shares = np.bincount(np.argmax(logits, axis=-1), minlength=10) / len(logits)
    return int(np.sum(shares >= MIN_FRACTION)), shares


def _flatten(params: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(params)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()
