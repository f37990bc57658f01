"""The command line end to end, the configs, and training across processes."""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import (
    cifar10_resnet,
    cifar10_sndcgan,
    common,
    default,
    grid2d,
    imagenet128_projection,
    ring2d,
    stl10_resnet,
    stl10_sndcgan,
)
from sngan_jax import checkpoints, loop, models, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_CONFIGS = [
    default.get_config(),
    ring2d.get_config(),
    grid2d.get_config(),
    cifar10_sndcgan.get_config("A"),
    stl10_sndcgan.get_config("F"),
    cifar10_resnet.get_config(),
    stl10_resnet.get_config(),
    imagenet128_projection.get_config(),
    imagenet128_projection.get_config("concat"),
]
PAPER_CONFIGS = ALL_CONFIGS[3:]


def run_main(args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "sngan_jax.main", *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_default_command_writes_the_whole_workdir(tmp_path):
    workdir = tmp_path / "digits"
    result = run_main(
        [
            "--config=configs/default.py",
            f"--workdir={workdir}",
            "--config.total_steps=4",
            "--config.log_every=2",
            "--config.sample_every=2",
            "--config.checkpoint_every=2",
            "--config.model.ch=8",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4/4 | d_loss" in result.stdout

    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 4 and config["model"]["ch"] == 8
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    records = [r for r in lines if "d_loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    # The default config scores the digits at the end (eval_every or not).
    (scored,) = [r for r in lines if "eval/digits/fid" in r]
    assert scored["step"] == 4 and scored["eval_protocol"]["name"] == "paper"
    assert (workdir / "eval" / "0000004.json").exists()
    assert "digits: FID" in result.stdout
    for key in (
        "d_loss",
        "g_loss",
        "d_real",
        "d_fake",
        "sigma_min",
        "sigma_max",
        "images_per_s",
    ):
        assert key in records[-1]
    assert 0 < records[-1]["sigma_min"] <= records[-1]["sigma_max"]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert sorted(os.listdir(workdir / "samples")) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.dataset.name)
def test_every_config_has_the_common_fields_and_builds(config):
    expected = common.base()
    for key in expected:
        assert key in config, key
    for section in ("dataset", "model", "loss", "optimizer"):
        assert set(config[section]) == set(expected[section])
    g, d = models.build(config.model)
    assert g is not None and d is not None


def test_adam_settings_follow_table_1():
    config = cifar10_sndcgan.get_config("D")
    assert (config.optimizer.lr, config.optimizer.b1, config.optimizer.b2) == (
        1e-3,
        0.5,
        0.9,
    )
    assert config.n_dis == 5
    with pytest.raises(ValueError, match="the paper's are"):
        cifar10_sndcgan.get_config("G")


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda c: c.dataset.name)
def test_paper_configs_pass_the_config_checks(config):
    validate.check(config, 1)


def test_the_command_line_reports_bad_configs_without_a_traceback(tmp_path):
    # No TensorFlow in the test environment: an unprepared tfds data set must
    # stop with the install command, not a traceback, and write nothing.
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    result = run_main(
        [
            "--config=configs/cifar10_resnet.py",
            f"--workdir={tmp_path / 'run'}",
            f"--config.dataset.data_dir={data_dir}",
        ]
    )
    assert result.returncode == 1
    assert "error: data set 'cifar10' is not prepared" in result.stderr
    assert "pip install -e '.[tfds]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(data_dir.iterdir()) == []

    result = run_main(
        [
            "--config=configs/default.py",
            f"--workdir={tmp_path}",
            "--config.model.image_size=16",
        ]
    )
    assert result.returncode == 1
    assert "has images of shape (8, 8, 1)" in result.stderr
    assert "Traceback" not in result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def tiny_ring_flags():
    # Adam's epsilon raised for the reason given in test_train.py.
    return [
        "--config=configs/ring2d.py",
        "--config.batch_size=32",
        "--config.total_steps=6",
        "--config.log_every=3",
        "--config.sample_every=6",
        "--config.checkpoint_every=3",
        "--config.optimizer.eps=0.001",
    ]


def test_a_second_start_loads_its_programs_from_the_compilation_cache(tmp_path):
    # Every program is cached here (the real threshold is a second of
    # compilation), in this test's own cache folder.
    cache = tmp_path / "cache"
    env = dict(
        os.environ,
        SNGAN_JAX_CACHE=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    first = run_main([*tiny_ring_flags(), f"--workdir={tmp_path / 'a'}"], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    programs = sorted(glob.glob(str(cache / "xla" / "*-cache")))
    assert programs, "nothing was written to the compilation cache"
    written = {p: os.stat(p).st_mtime_ns for p in programs}
    used = {p: (p[: -len("cache")] + "atime") for p in programs}
    used_before = {p: open(a, "rb").read() for p, a in used.items()}

    second = run_main([*tiny_ring_flags(), f"--workdir={tmp_path / 'b'}"], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    # The same programs, read (their last-use stamps move) and not compiled
    # and written again; and the loaded programs train to the same weights.
    assert sorted(glob.glob(str(cache / "xla" / "*-cache"))) == programs
    assert {p: os.stat(p).st_mtime_ns for p in programs} == written
    assert all(open(used[p], "rb").read() != used_before[p] for p in programs)
    a = checkpoints.Checkpointer(str(tmp_path / "a"))
    b = checkpoints.Checkpointer(str(tmp_path / "b"))
    state_a, _, _ = a.restore(a.latest_step())
    state_b, _, _ = b.restore(b.latest_step())
    a.close(), b.close()
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(x, y)

    # --nocompilation_cache neither reads nor writes it.
    used_before = {p: open(a, "rb").read() for p, a in used.items()}
    third = run_main(
        [*tiny_ring_flags(), f"--workdir={tmp_path / 'c'}", "--nocompilation_cache"],
        env=env,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(glob.glob(str(cache / "xla" / "*-cache"))) == programs
    assert {p: open(a, "rb").read() for p, a in used.items()} == used_before


def test_two_processes_train_like_one_process(tmp_path):
    """2 processes x 2 devices (gloo on CPU) against 1 process x 4 devices."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sngan_jax.main",
                *tiny_ring_flags(),
                f"--workdir={tmp_path / 'multi'}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es), 4 device(s) in all, 2 here" in outputs[0][0]
    assert "step 6/6" in outputs[0][0]
    assert "step" not in outputs[1][0]  # only process 0 reports

    result = run_main([*tiny_ring_flags(), f"--workdir={tmp_path / 'single'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es), 4 device(s) in all" in result.stdout

    states = []
    for name in ("multi", "single"):
        ckpt = checkpoints.Checkpointer(str(tmp_path / name))
        assert ckpt.latest_step() == 6
        states.append(ckpt.restore(6)[0])
        ckpt.close()
    for field in ("g_params", "d_params", "d_spectral"):
        for a, b in zip(
            jax.tree.leaves(states[0][field]),
            jax.tree.leaves(states[1][field]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)))


def test_loop_refuses_devices_argument_with_wrong_batch(tmp_path):
    config = ring2d.get_config()
    config.batch_size = 6
    with pytest.raises(validate.ConfigError, match="not divisible"):
        loop.train_and_evaluate(config, str(tmp_path), jax.local_devices())
