"""Sweeps: vectorized points equal sequential ones, stopped sweeps resume,
diverged points are recorded, and the command writes its summary."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import common
from sngan_jax import checkpoints, loop, sweep, vectorized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RING = """
from configs import ring2d


def get_config():
    config = ring2d.get_config()
    config.batch_size = 32
    config.total_steps = {steps}
    config.n_dis = 2
    config.log_every = 2
    config.sample_every = 100
    config.checkpoint_every = 3
    config.model.ch = 16
    config.model.depth = 1
    config.model.z_dim = 4
    config.optimizer.eps = 1e-3  # see tests/test_train.py: tames rounding
    return config


def get_sweep():
    return {sweep}
"""

GRID_2X2 = """[
        {"labels": {"lr": lr, "b2": b2}, "optimizer.lr": lr, "optimizer.b2": b2}
        for lr in (1e-3, 3e-3)
        for b2 in (0.9, 0.999)
    ]"""


def write_config(tmp_path, steps=6, sweep_expr=GRID_2X2, name="tiny_sweep.py"):
    path = tmp_path / name
    path.write_text(TINY_RING.format(steps=steps, sweep=textwrap.dedent(sweep_expr)))
    return str(path)


def points_of(path, cli=None):
    module = sweep._load_module(path)
    return sweep.load_points(path, module.get_config(), cli or {})


def final_params(workdir):
    ckpt = checkpoints.Checkpointer(workdir)
    state, _, _ = ckpt.restore(ckpt.latest_step())
    ckpt.close()
    return {"g": state["g_params"], "d": state["d_params"], "step": state["step"]}


def test_a_vectorized_2x2_sweep_equals_running_the_points_one_by_one(
    tmp_path, monkeypatch
):
    points = points_of(write_config(tmp_path))
    assert [p.name for p in points] == [
        "0.001-0.9",
        "0.001-0.999",
        "0.003-0.9",
        "0.003-0.999",
    ]
    assert vectorized.can_vectorize([p.config for p in points])
    calls = []
    original = vectorized.train_points
    monkeypatch.setattr(
        vectorized,
        "train_points",
        lambda configs, workdirs: (
            calls.append(len(configs)) or original(configs, workdirs)
        ),
    )
    sweep.run(points, str(tmp_path / "vectorized"), vectorize=True)
    sweep.run(points, str(tmp_path / "sequential"), vectorize=False)
    assert calls == [4]  # one program for the four points, and none one by one

    for point in points:
        vec = final_params(point.workdir(str(tmp_path / "vectorized")))
        seq = final_params(point.workdir(str(tmp_path / "sequential")))
        assert int(vec["step"]) == int(seq["step"]) == 6
        for a, b in zip(
            jax.tree.leaves((vec["g"], vec["d"])),
            jax.tree.leaves((seq["g"], seq["d"])),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Different hyperparameters did give different networks.
    first, last = (
        final_params(p.workdir(str(tmp_path / "vectorized")))
        for p in (points[0], points[-1])
    )
    assert not np.allclose(
        jax.tree.leaves(first["d"])[0], jax.tree.leaves(last["d"])[0]
    )


def test_a_stopped_sweep_resumes_without_retraining_finished_points(
    tmp_path, monkeypatch
):
    points = points_of(write_config(tmp_path))
    root = str(tmp_path / "sweep")
    trained = []
    original = loop.train_and_evaluate

    def stop_at_third(config, workdir, devices=None):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the user stops the sweep
        trained.append(os.path.basename(workdir))
        return original(config, workdir, devices)

    monkeypatch.setattr(loop, "train_and_evaluate", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(points, root, vectorize=False)
    assert trained == ["0.001-0.9", "0.001-0.999"]
    assert sweep.read_status(points[2].workdir(root)) is None

    trained.clear()
    monkeypatch.setattr(
        loop,
        "train_and_evaluate",
        lambda c, w, d=None: trained.append(os.path.basename(w)) or original(c, w, d),
    )
    rows = sweep.run(points, root, vectorize=False)
    assert trained == ["0.003-0.9", "0.003-0.999"]  # the first two were not retrained
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert all(r["step"] == 6 for r in rows)
    # Raising total_steps trains the finished points on from their checkpoints
    # (the last at step 6), together again.
    longer = points_of(write_config(tmp_path, steps=9, name="longer.py"))
    trained.clear()
    rows = sweep.run(longer, root, vectorize=True)
    assert trained == []  # one vectorized group, not one by one
    assert [r["step"] for r in rows] == [9] * 4
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert os.path.getsize(os.path.join(root, name)) > 0
    with open(os.path.join(root, "summary.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == [p.name for p in points]
    assert {"lr", "b2", "status", "toy/modes", "d_loss"} <= set(table[0])


def test_a_diverging_point_is_recorded_and_the_others_go_on(tmp_path):
    explode = """[
        {"labels": {"lr": "normal"}, "optimizer.lr": 1e-3},
        {"labels": {"lr": "huge"}, "optimizer.lr": 1e30},
    ]"""
    points = points_of(write_config(tmp_path, sweep_expr=explode))
    for vectorize in (True, False):
        root = str(tmp_path / f"vectorize_{vectorize}")
        rows = sweep.run(points, root, vectorize=vectorize)
        assert [r["status"] for r in rows] == ["finished", "diverged"], rows
        assert rows[0]["step"] == 6 and rows[1]["step"] < 6
        assert "d_loss" in rows[0] and "d_loss" not in rows[1]
        status = sweep.read_status(points[1].workdir(root))
        assert "NaN or Inf" in status["message"]


def test_points_need_known_fields_and_unique_names(tmp_path):
    bad = '[{"optimizer.learning_rate": 1e-3}]'
    with pytest.raises(
        Exception, match="unknown config field 'optimizer.learning_rate'"
    ):
        points_of(write_config(tmp_path, sweep_expr=bad))
    twice = '[{"labels": {"x": 1}, "n_dis": 1}, {"labels": {"x": 1}, "n_dis": 2}]'
    with pytest.raises(Exception, match="share names"):
        points_of(write_config(tmp_path, sweep_expr=twice))


def test_robustness_configs_cross_six_settings_with_six_methods():
    points = common.robustness_sweep()
    assert len(points) == 36
    assert {p["labels"]["method"] for p in points} == set(common.METHODS)
    gp = next(p for p in points if p["labels"] == {"setting": "D", "method": "gp"})
    assert gp["optimizer.lr"] == 1e-3 and gp["n_dis"] == 5
    assert gp["loss.gp_weight"] == 10.0 and gp["model.d_norm"] == "none"


def test_sweep_command_applies_its_overrides_to_every_point(tmp_path):
    path = write_config(tmp_path, steps=50)
    root = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "sngan_jax.sweep",
        f"--config={path}",
        f"--workdir={root}",
        "--config.total_steps=4",
        "--only=0.001-0.9,0.003-0.9",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 2 points finished, 0 diverged" in result.stdout
    for name in ("0.001-0.9", "0.003-0.9"):
        config = json.loads((root / name / "config.json").read_text())
        assert config["total_steps"] == 4
    assert not (root / "0.001-0.999").exists()
    table = (root / "summary.md").read_text()
    assert "total_steps=4" in table and table.count("| finished |") == 2
    bad = subprocess.run(
        [*cmd[:5], "--only=nope"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 1 and "unknown points ['nope']" in bad.stderr


def test_vectorized_convolutional_points_equal_sequential_ones(tmp_path):
    # vmap turns the points' convolutions into batched ones; the digits model
    # (convolutions, batch norm in G, EMA) must still match point by point.
    path = tmp_path / "digits_sweep.py"
    path.write_text(
        textwrap.dedent(
            """
            from configs import default


            def get_config():
                config = default.get_config()
                config.total_steps = 4
                config.checkpoint_every = 4
                config.sample_every = 100
                config.log_every = 2
                config.eval_every = 0
                config.model.ch = 8
                config.optimizer.eps = 1e-3
                return config


            def get_sweep():
                return [
                    {"optimizer.lr": 1e-3},
                    {"optimizer.lr": 2e-3, "optimizer.b1": 0.0},
                ]
            """
        )
    )
    points = points_of(str(path))
    sweep.run(points, str(tmp_path / "vec"), vectorize=True)
    sweep.run(points, str(tmp_path / "seq"), vectorize=False)
    for point in points:
        vec = final_params(point.workdir(str(tmp_path / "vec")))
        seq = final_params(point.workdir(str(tmp_path / "seq")))
        for a, b in zip(
            jax.tree.leaves((vec["g"], vec["d"])),
            jax.tree.leaves((seq["g"], seq["d"])),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
