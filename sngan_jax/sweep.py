"""Sweeps: ``python -m sngan_jax.sweep --config=configs/x.py --workdir=DIR``.

The config module defines ``get_sweep()``: a list of points, each a dict of
config overrides (``{"optimizer.lr": 1e-3, "n_dis": 5}``), optionally with a
``"labels"`` dict naming the point for tables and plots
(``{"setting": "A", "method": "spectral"}``). Every point trains in its own
sub-workdir of ``--workdir``; overrides on this command line
(``--config.total_steps=...``) apply to every point and win over the
point's own.

A finished (or diverged) point is recorded in ``<point>/sweep_status.json``
and skipped when the sweep runs again, so a stopped sweep resumes where it
was; an unfinished point resumes from its checkpoint, and so does a finished
one when ``total_steps`` has been raised since. Points that differ only
in Adam's hyperparameters are trained together in one vectorized program
(``vectorized.py``) unless ``--vectorize=false``.

At the end ``summary.csv``, ``summary.md`` and ``summary.png`` (the sweep's
metric per point) are written to ``--workdir``.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sngan_jax import compiler, data, files, loop, validate, vectorized, writers
from sngan_jax.evaluation.evaluator import EvaluationError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "A config file that defines get_sweep().", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory of the sweep; one sub-folder a point.")
flags.DEFINE_bool("vectorize", True, "Train points that differ only in Adam together.")
flags.DEFINE_list("only", [], "Run only the points with these names.")
compiler.define_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])

STATUS_FILE = "sweep_status.json"
# Metrics shown in the summary when a run logged them, in this order.
SUMMARY_METRICS = (
    "toy/modes",
    "toy/high_quality",
    "eval/digits/fid",
    "eval/digits/is_mean",
    "eval/digits/classes",
    "eval/inception/fid",
    "eval/inception/is_mean",
    "d_loss",
    "g_loss",
)


# --- points ---------------------------------------------------------------------


class Point:
    """One setting of a sweep: its name, labels, overrides and full config."""

    def __init__(self, spec: dict[str, Any], base: ml_collections.ConfigDict):
        spec = dict(spec)
        self.labels = dict(spec.pop("labels", {}))
        self.overrides = spec
        self.name = _point_name(self.labels, self.overrides)
        self.config = apply_overrides(base, self.overrides)

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.name)


def _point_name(labels: dict[str, Any], overrides: dict[str, Any]) -> str:
    parts = labels.values() if labels else (f"{k}={v}" for k, v in overrides.items())
    name = "-".join(str(p) for p in parts) or "base"
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def apply_overrides(
    base: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of ``base`` with dotted-path ``overrides`` set; unknown fields fail."""
    config = copy.deepcopy(base)
    with config.unlocked():
        for path, value in overrides.items():
            *parents, leaf = path.split(".")
            node = config
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise validate.ConfigError(
                    f"sweep point sets unknown config field {path!r}"
                )
            node[leaf] = (
                type(node[leaf])(value) if _same_kind(node[leaf], value) else value
            )
    return config


def _same_kind(old: Any, new: Any) -> bool:
    # int -> float promotions (lr=1 in a float field) keep the field's type.
    return isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool)


def load_points(
    config_path: str, base: ml_collections.ConfigDict, cli_overrides: dict[str, Any]
) -> list[Point]:
    """The points of the config file's ``get_sweep()``, command line applied last."""
    module = _load_module(config_path.split(":")[0])
    if not hasattr(module, "get_sweep"):
        raise validate.ConfigError(
            f"{config_path} defines no get_sweep(); a sweep config returns a list "
            f"of override dicts from get_sweep()"
        )
    points = [Point({**spec, **cli_overrides}, base) for spec in module.get_sweep()]
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise validate.ConfigError(f"sweep points share names: {duplicates}")
    return points


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- running ----------------------------------------------------------------------


def run(points: Sequence[Point], root: str, vectorize: bool = True) -> list[dict]:
    """Trains every point that has not finished; returns the summary rows."""
    todo = [p for p in points if not _done(p, root)]
    if len(todo) < len(points):
        writers.console(f"{len(points) - len(todo)} of {len(points)} points done")
    for group in _groups(todo, vectorize):
        names = ", ".join(p.name for p in group)
        writers.console(f"training {names}")
        start = time.perf_counter()
        results = _train_group(group, root)
        seconds = (time.perf_counter() - start) / len(group)
        for point in group:
            result = {**results[point.name], "seconds_per_point": round(seconds, 1)}
            write_status(point.workdir(root), result)
    rows = [summary_row(p, root) for p in points]
    write_summary(rows, root)
    return rows


def _done(point: Point, root: str) -> bool:
    """Diverged, or finished at (or past) the point's ``total_steps``.

    A point finished with fewer steps than its config now asks for is trained
    on from its checkpoint.
    """
    status = read_status(point.workdir(root))
    if status is None:
        return False
    return status["status"] == "diverged" or (
        status["step"] >= point.config.total_steps
    )


def _groups(points: Sequence[Point], vectorize: bool) -> list[list[Point]]:
    """Points that can train together, in order of first appearance."""
    if not vectorize:
        return [[p] for p in points]
    groups: list[list[Point]] = []
    for point in points:
        for group in groups:
            if vectorized.can_vectorize([group[0].config, point.config]):
                group.append(point)
                break
        else:
            groups.append([point])
    return groups


def _train_group(group: list[Point], root: str) -> dict[str, dict]:
    workdirs = [p.workdir(root) for p in group]
    if len(group) > 1:
        try:
            results = vectorized.train_points([p.config for p in group], workdirs)
            return {p.name: results[w] for p, w in zip(group, workdirs, strict=True)}
        except ValueError as e:  # e.g. checkpoints at different steps
            writers.console(f"training one by one: {e}")
    return {p.name: _train_one(p, w) for p, w in zip(group, workdirs, strict=True)}


def _train_one(point: Point, workdir: str) -> dict[str, Any]:
    try:
        state = loop.train_and_evaluate(point.config, workdir)
    except FloatingPointError as e:
        return {"status": "diverged", "step": _last_step(workdir), "message": str(e)}
    return {"status": "finished", "step": int(state.step), "message": ""}


def _last_step(workdir: str) -> int:
    metrics = read_metrics(workdir)
    return int(metrics.get("step", 0))


def read_status(workdir: str) -> dict | None:
    path = os.path.join(workdir, STATUS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_status(workdir: str, status: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, STATUS_FILE), status)


# --- summary ----------------------------------------------------------------------


def read_metrics(workdir: str) -> dict[str, Any]:
    """The last value of every scalar in a run's ``metrics.jsonl``."""
    last: dict[str, Any] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    last.update(json.loads(line))
    return last


def summary_row(point: Point, root: str) -> dict[str, Any]:
    workdir = point.workdir(root)
    status = read_status(workdir) or {"status": "not run", "step": 0}
    metrics = read_metrics(workdir)
    row = {"point": point.name, **point.labels}
    row["overrides"] = "; ".join(f"{k}={v}" for k, v in point.overrides.items())
    row["status"] = status["status"]
    row["step"] = status.get("step", 0)
    if status["status"] != "diverged":  # a diverged run's last numbers mean nothing
        row.update({k: metrics[k] for k in SUMMARY_METRICS if k in metrics})
    row["seconds_per_point"] = status.get("seconds_per_point", "")
    return row


def write_summary(rows: list[dict], root: str, metric: str | None = None) -> None:
    """``summary.csv``, ``summary.md`` and ``summary.png`` in ``root``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(root, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write("| " + " | ".join(columns) + " |\n")
        f.write("|" + "---|" * len(columns) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |\n")
    metric = metric or next((m for m in SUMMARY_METRICS if m in columns), None)
    if metric:
        plot(rows, metric, os.path.join(root, "summary.png"))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "diverged" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def plot(rows: list[dict], metric: str, path: str) -> None:
    """``metric`` per point: one line per second label (method) over the first
    (setting), or one bar per point when points have fewer than two labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in rows[0] if k not in ("point", "overrides", "status", "step")]
    labels = [k for k in labels if k not in SUMMARY_METRICS][:2]
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(labels) == 2:
        x_key, line_key = labels
        xs = list(dict.fromkeys(r[x_key] for r in rows))
        for line in dict.fromkeys(r[line_key] for r in rows):
            ys = [_value(rows, {x_key: x, line_key: line}, metric) for x in xs]
            ax.plot(range(len(xs)), ys, marker="o", label=str(line))
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(x_key)
        ax.legend(title=line_key, fontsize=8)
    else:
        ax.bar(range(len(rows)), [r.get(metric, math.nan) for r in rows])
        ax.set_xticks(range(len(rows)), [r["point"] for r in rows], rotation=90)
    ax.set_ylabel(metric + " (gaps: diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _value(rows: list[dict], match: dict, metric: str) -> float:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            value = row.get(metric, math.nan)
            return float(value) if value != "" else math.nan
    return math.nan


# --- command line -----------------------------------------------------------------


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compiler.cache_if_flagged()
    cli = config_flags.get_override_values(FLAGS["config"])
    try:
        path = config_flags.get_config_filename(FLAGS["config"])
        points = load_points(path, FLAGS.config, cli)
        if FLAGS.only:
            unknown = sorted(set(FLAGS.only) - {p.name for p in points})
            if unknown:
                raise validate.ConfigError(
                    f"--only names unknown points {unknown}; the points are "
                    f"{[p.name for p in points]}"
                )
            points = [p for p in points if p.name in FLAGS.only]
        os.makedirs(FLAGS.workdir, exist_ok=True)
        rows = run(points, FLAGS.workdir, FLAGS.vectorize)
    except (validate.ConfigError, data.DataError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finished = sum(r["status"] == "finished" for r in rows)
    print(
        f"{finished} of {len(rows)} points finished, "
        f"{sum(r['status'] == 'diverged' for r in rows)} diverged; "
        f"summary in {os.path.join(FLAGS.workdir, 'summary.md')}"
    )


if __name__ == "__main__":
    app.run(main)
