"""Features of many images, computed on every local device in fixed-size batches.

A feature network (Inception, the digits classifier) is pmapped over the
local devices with its parameters replicated once. Images arrive as uint8
host batches of any size; they are re-cut into global batches of
``batch_per_device * num_devices``, the last one padded, so the network
compiles once whatever the number of images.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from sngan_jax import compiler

# fn(params, images (B, H, W, C) uint8) -> dict of (B, ...) arrays.
FeatureFn = Callable[[Any, jax.Array], dict[str, jax.Array]]


class FeatureExtractor:
    """``fn`` with ``params``, applied to image batches on all local devices."""

    def __init__(
        self,
        fn: FeatureFn,
        params: Any,
        *,
        batch_per_device: int = 100,
        devices: Sequence[jax.Device] | None = None,
    ):
        # Local devices only: evaluation needs no communication, and in a
        # multi-process run only process 0 evaluates.
        self.devices = list(devices or jax.local_devices())
        self.batch_per_device = batch_per_device
        self._apply = compiler.pmap(fn, devices=self.devices)
        place = jax.pmap(lambda x: x, devices=self.devices)
        n = len(self.devices)
        self._params = place(
            jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), params)
        )

    @property
    def global_batch(self) -> int:
        return self.batch_per_device * len(self.devices)

    def __call__(
        self, batches: Iterable[np.ndarray], total: int, desc: str = "features"
    ) -> dict[str, np.ndarray]:
        """Concatenated outputs ``{name: (total, ...)}`` for ``total`` images."""
        progress = Progress(desc, total)
        outputs = []
        for images in _rebatch(batches, self.global_batch, total):
            outputs.append(self._run(images))
            progress.update(len(images))
        progress.close()
        if not outputs:
            raise ValueError(f"{desc}: no images to compute features of")
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        num = len(images)
        padded = np.zeros((self.global_batch, *images.shape[1:]), images.dtype)
        padded[:num] = images
        shards = padded.reshape(
            len(self.devices), self.batch_per_device, *images.shape[1:]
        )
        out = self._apply(self._params, shards)
        return {
            k: np.asarray(v).reshape(self.global_batch, *v.shape[2:])[:num]
            for k, v in out.items()
        }


def _rebatch(
    batches: Iterable[np.ndarray], size: int, total: int
) -> Iterator[np.ndarray]:
    """Batches of exactly ``size`` (the last may be short) of the first ``total``."""
    buffer, buffered, seen = [], 0, 0
    for batch in batches:
        batch = np.asarray(batch)[: total - seen]
        seen += len(batch)
        buffer.append(batch)
        buffered += len(batch)
        while buffered >= size:
            joined = np.concatenate(buffer)
            yield joined[:size]
            buffer, buffered = [joined[size:]], buffered - size
        if seen >= total:
            break
    if buffered:
        yield np.concatenate(buffer)
    if seen < total:
        raise ValueError(f"expected {total} images, the input ended after {seen}")


class Progress:
    """A one-line progress bar on a terminal; one summary line otherwise."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.done = desc, total, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, num: int) -> None:
        self.done += num
        if self.tty:
            frac = self.done / max(self.total, 1)
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"\r{self.desc}: [{'#' * int(30 * frac):<30}] {self.done}/{self.total}"
                f" ({rate:,.0f} img/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)  # end the bar's line
        seconds = time.perf_counter() - self.start
        print(f"{self.desc}: {self.done} images in {seconds:.1f} s", file=sys.stderr)
