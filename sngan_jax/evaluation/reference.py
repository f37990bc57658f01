"""Features of the real images that generated ones are compared with, cached.

Computing the reference statistics of 10,000-50,000 images takes minutes, so
they are computed once per (data set, split, image count, image size, feature
network and weights) and cached under ``cache_dir("reference")``. The cache
file holds that description, which every score then reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from sngan_jax import data, files
from sngan_jax.evaluation import cache_dir, metrics
from sngan_jax.evaluation.features import FeatureExtractor

VERSION = 1  # bump when what is cached changes
READ_CHUNK = 500  # real images read per batch


class Reference:
    """Real features ``(N, D)``, their labels (or None), statistics and description."""

    def __init__(self, arrays: Mapping[str, np.ndarray], meta: dict[str, Any]):
        self.features = arrays["features"]
        self.labels = arrays["labels"] if arrays["labels"].size else None
        self.mu, self.sigma = arrays["mu"], arrays["sigma"]
        self.meta = meta
        self._class_stats = None

    def class_stats(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per-class ``(mu, sigma)``, for intra-FID."""
        if self.labels is None:
            raise ValueError("the reference images have no labels")
        if self._class_stats is None:
            self._class_stats = {
                int(c): metrics.gaussian_stats(self.features[self.labels == c])
                for c in np.unique(self.labels)
            }
        return self._class_stats


def real_split(dataset: Mapping[str, Any], protocol_split: str) -> str:
    """The split the reference images come from; ``all`` for non-tfds sources."""
    if dataset["name"] in ("digits", "image_folder"):
        return "all"
    return protocol_split


def load(
    dataset: Mapping[str, Any],
    *,
    split: str,
    num: int,
    image_size: int,
    channels: int,
    extractor: FeatureExtractor,
    extractor_meta: dict[str, Any],
) -> Reference:
    """The reference of the first ``num`` images of ``split`` (fewer if it is short).

    ``extractor_meta`` names the feature network and its weights' checksum;
    it is part of the cache key.
    """
    dataset = {**dataset, "split": "" if split == "all" else split}
    source, _ = data.image_source(dataset, image_size, channels)
    num = min(num, len(source))
    meta = {
        "dataset": dataset["name"],
        "path": os.path.abspath(dataset["path"]) if dataset["path"] else "",
        "split": split,
        "num_real": num,
        "image_size": image_size,
        "channels": channels,
        "features": extractor_meta,
        "version": VERSION,
    }
    path = _cache_path(meta)
    if os.path.exists(path):
        with np.load(path) as f:
            return Reference(dict(f), meta)
    arrays = _compute(source, num, extractor, desc=f"reference {meta['dataset']}")
    files.save_npz(path, {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))})
    return Reference(arrays, meta)


def _compute(source, num: int, extractor: FeatureExtractor, desc: str) -> dict:
    labels = []

    def batches():
        for start in range(0, num, READ_CHUNK):
            batch = source.get_batch(np.arange(start, min(start + READ_CHUNK, num)))
            labels.append(batch.get("labels", np.zeros(0, np.int32)))
            yield batch["images"]

    features = extractor(batches(), num, desc)["pool"].astype(np.float32)
    mu, sigma = metrics.gaussian_stats(features)
    return {
        "features": features,
        "labels": np.concatenate(labels).astype(np.int32),
        "mu": mu,
        "sigma": sigma,
    }


def _cache_path(meta: dict[str, Any]) -> str:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    name = (
        f"{meta['dataset']}_{meta['split']}_{meta['num_real']}_{meta['image_size']}px"
    )
    return os.path.join(cache_dir("reference"), f"{name}_{key}.npz")
