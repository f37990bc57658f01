"""Where scores go: ``eval/<step>.json``, ``metrics.jsonl`` and ``best.json``.

``eval/<step>.json`` holds every evaluation of that step's generator, one per
(protocol, generator) pair: a later evaluation under the same pair replaces
the earlier one, others are kept beside it. Each carries its full protocol.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from sngan_jax import files

# Scores that pick the best checkpoint when eval.best_metric is empty, in order.
DEFAULT_BEST = ("inception/fid", "digits/fid")


def eval_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"{step:07d}.json")


def write(workdir: str, record: dict[str, Any]) -> str:
    """Adds ``record`` to its step's file (atomically); returns the file's path."""
    path = eval_path(workdir, record["step"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kept = [r for r in read(path) if _key(r) != _key(record)]
    files.write_json(path, {"step": record["step"], "evaluations": [*kept, record]})
    return path


def read(path: str) -> list[dict[str, Any]]:
    """The evaluations in an ``eval/<step>.json`` file (empty if it is missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["evaluations"]


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return record["protocol"]["name"], record["generator"]


def scalars(record: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a record: ``eval/<score>`` and the protocol."""
    out = {f"eval/{k}": v for k, v in record["scores"].items()}
    out["eval_generator"] = record["generator"]
    out["eval_protocol"] = record["protocol"]
    if record["errors"]:
        out["eval_errors"] = record["errors"]
    return out


class Best:
    """The best score so far of one lower-is-better metric, kept in ``best.json``."""

    def __init__(self, workdir: str, metric: str = ""):
        self.path = os.path.join(workdir, "best.json")
        self.metric = metric
        self.value = math.inf
        if os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if not metric or saved["metric"] == metric:
                self.metric, self.value = saved["metric"], saved["value"]

    def update(self, record: dict[str, Any]) -> bool:
        """True (and ``best.json`` rewritten) when ``record`` beats the best so far."""
        scores = record["scores"]
        metric = self.metric or next((m for m in DEFAULT_BEST if m in scores), "")
        value = scores.get(metric)
        if value is None or not math.isfinite(value) or value >= self.value:
            return False
        self.metric, self.value = metric, float(value)
        best = {
            "metric": metric,
            "value": self.value,
            "step": record["step"],
            "generator": record["generator"],
            "protocol": record["protocol"],
        }
        files.write_json(self.path, best)
        return True
