"""Where a run's records go: metrics.jsonl, TensorBoard, sample PNGs, console.

Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from PIL import Image


class MetricWriter:
    """Appends one JSON object per call to ``metrics.jsonl``, mirrors to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step``: a resumed run writes them again."""
        if not self.enabled or not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            with open(self.jsonl_path, "w") as f:
                f.writelines(kept)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in scalars.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def write_image(self, step: int, image: Image.Image) -> str | None:
        """Saves ``samples/step_<step>.png`` and logs it to TensorBoard."""
        if not self.enabled:
            return None
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        image.save(path)
        array = np.asarray(image.convert("RGB"))
        self._tb.add_image("samples", array, step, dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_python(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "item"):
        value = np.asarray(value).item()
    return value


def console(message: str) -> None:
    """One line for the person watching the run (stdout, process 0 only)."""
    if jax.process_index() == 0:
        print(message, flush=True)
