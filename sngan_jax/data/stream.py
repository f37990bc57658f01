"""Seeded, resumable streams of global batches.

A stream is a pure function of its position: batch ``b`` of a run is the same
whatever happened before, so the only state a checkpoint needs is the number
of batches consumed. Each process draws the whole global batch's indices and
keeps its own contiguous slice, so one process with N devices and P processes
with N / P devices each see the same global batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class _Stream:
    """Base: position bookkeeping and the per-process slice of a global batch."""

    def __init__(
        self, global_batch: int, seed: int, process_index: int, process_count: int
    ):
        if global_batch % process_count:
            raise ValueError(
                f"the global batch size {global_batch} must be divisible by the "
                f"number of processes {process_count}"
            )
        self.global_batch = global_batch
        self.seed = seed
        self.batches = 0
        per_process = global_batch // process_count
        self._rows = slice(
            process_index * per_process, (process_index + 1) * per_process
        )

    def get_state(self) -> dict[str, int]:
        """What a checkpoint stores to resume the stream exactly."""
        return {"batches": self.batches, "seed": self.seed}

    def set_state(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's data stream used seed {state['seed']}, this "
                f"run uses {self.seed}; resume with the same seed"
            )
        self.batches = int(state["batches"])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self._global_batch_slice(self.batches)
        self.batches += 1
        return batch

    def _global_batch_slice(self, b: int) -> Batch:
        raise NotImplementedError


class Source(Protocol):
    """A random-access data set: its length and a batch of examples by index."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> Batch: ...


class ArraySource:
    """In-memory arrays (``images`` and optional ``labels``) as a ``Source``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)
        sizes = {len(v) for v in self.arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays of different lengths: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get_batch(self, indices: np.ndarray) -> Batch:
        return {k: v[indices] for k, v in self.arrays.items()}


class ShuffledStream(_Stream):
    """Shuffled epochs over a ``Source``, infinite.

    Epoch ``e`` visits the examples in the order of a permutation seeded by
    ``(seed, e)``; batches run across epoch boundaries, so every batch is full.
    Only this process's rows of each global batch are read.
    """

    def __init__(
        self,
        source: Source,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__(global_batch, seed, process_index, process_count)
        self.source = source
        self.size = len(source)
        if self.size == 0:
            raise ValueError("the data set is empty")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache[epoch] = rng.permutation(self.size)
        return self._perm_cache[epoch]

    def indices(self, b: int) -> np.ndarray:
        """Indices into the source of this process's rows of global batch ``b``."""
        positions = np.arange(b * self.global_batch, (b + 1) * self.global_batch)
        positions = positions[self._rows]
        epochs, offsets = np.divmod(positions, self.size)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch))[offsets[mask]]
        return indices

    def _global_batch_slice(self, b: int) -> Batch:
        return self.source.get_batch(self.indices(b))


class SamplerStream(_Stream):
    """Fresh samples every batch from ``sample(num, rng) -> array``."""

    def __init__(
        self,
        sample: Callable[[int, np.random.Generator], np.ndarray],
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__(global_batch, seed, process_index, process_count)
        self.sample = sample

    def _global_batch_slice(self, b: int) -> Batch:
        rng = np.random.default_rng([self.seed, b])
        return {"images": self.sample(self.global_batch, rng)[self._rows]}
