"""Reliability: damaged checkpoints, divergence, config and data errors, disk.

Preemption by signals has its own file (``test_preemption.py``). Every test
here drives the real loop or the real command line on a tiny config and checks
both the message a user gets and that nothing they might want back is lost.
"""

import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import ring2d
from sngan_jax import checkpoints, loop, optim, train, validate
from sngan_jax.measure import CompileCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ring(**overrides):
    config = ring2d.get_config()
    config.batch_size = 32
    config.total_steps = 6
    config.model.ch = 32
    config.log_every = 2
    config.sample_every = 100
    config.checkpoint_every = 3
    config.update(overrides)
    return config


RING_FLAGS = [
    "--config=configs/ring2d.py",
    "--config.batch_size=32",
    "--config.model.ch=32",
    "--config.log_every=2",
    "--config.sample_every=100",
    "--config.checkpoint_every=3",
]


def run_main(args, timeout=600, **kwargs):
    cmd = [sys.executable, "-m", "sngan_jax.main", *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def arrays(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same_arrays(a, b):
    a, b = arrays(a), arrays(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def restore(workdir, step):
    ckpt = checkpoints.Checkpointer(str(workdir))
    try:
        return ckpt.restore(step)
    finally:
        ckpt.close()


def steps_of(workdir):
    ckpt = checkpoints.Checkpointer(str(workdir))
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


# Damaged and unfinished checkpoints.


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run of 6 steps with checkpoints at 3 and 6, and one straight to 9."""
    base = tmp_path_factory.mktemp("six")
    loop.train_and_evaluate(tiny_ring(), str(base / "run"))
    straight = loop.train_and_evaluate(tiny_ring(total_steps=9), str(base / "nine"))
    return base / "run", straight


def damage_truncate(step_dir):
    # The largest array file of the state, cut in half: a partial copy or a
    # disk that filled up after the fact.
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def damage_scribble(step_dir):
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\0" * 64)


def damage_lose_metadata(step_dir):
    os.remove(step_dir / "state" / "_METADATA")


def damage_lose_item(step_dir):
    shutil.rmtree(step_dir / "data")


@pytest.mark.parametrize(
    "damage",
    [damage_truncate, damage_scribble, damage_lose_metadata, damage_lose_item],
    ids=["truncated", "overwritten", "no-metadata", "no-data-item"],
)
def test_a_damaged_latest_checkpoint_is_set_aside_for_the_one_before(
    six_steps, tmp_path, capsys, damage
):
    source, straight = six_steps
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage(workdir / "checkpoints" / "6")
    original = sorted(p.name for p in (workdir / "checkpoints" / "6").rglob("*"))
    capsys.readouterr()

    state = loop.train_and_evaluate(tiny_ring(total_steps=9), str(workdir))

    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "unreadable" in line]
    assert len(warnings) == 1, out
    assert warnings[0].startswith("warning: the checkpoint of step 6 is unreadable")
    assert "Traceback" not in out
    assert "resumed from the checkpoint at step 3" in out
    # Set aside whole, not deleted; the run went on from step 3 and reached
    # exactly the weights of a run that never stopped.
    kept = workdir / "unreadable_checkpoints" / "checkpoints" / "6"
    assert sorted(p.name for p in kept.rglob("*")) == original
    assert steps_of(workdir) == [3, 6, 9]
    assert_same_arrays(state, straight)


def test_an_unfinished_save_is_reported_and_ignored(six_steps, tmp_path, capsys):
    source, straight = six_steps
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    # What a process killed while saving step 6 leaves: orbax's temporary folder.
    half = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1764823000"
    os.rename(workdir / "checkpoints" / "6", half)
    capsys.readouterr()

    state = loop.train_and_evaluate(tiny_ring(total_steps=9), str(workdir))

    out = capsys.readouterr().out
    assert "warning: ignoring 1 unfinished checkpoint save(s)" in out
    assert "resumed from the checkpoint at step 3" in out
    assert half.is_dir()  # left for the user to delete
    assert_same_arrays(state, straight)


def test_a_checkpoint_of_another_model_is_refused_with_advice(six_steps, tmp_path):
    source, _ = six_steps
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    wider = tiny_ring(total_steps=9, allow_config_change=True)
    wider.model.ch = 64
    with pytest.raises(checkpoints.CheckpointError, match="another structure"):
        loop.train_and_evaluate(wider, str(workdir))
    assert steps_of(workdir) == [3, 6]  # whole checkpoints are never set aside
    assert not (workdir / "unreadable_checkpoints").exists()


# Divergence.


def poison_generator(monkeypatch, at_step, above_lr=0.0):
    """Makes the generator's weights NaN in the update of step ``at_step``.

    Only while the generator's learning rate exceeds ``above_lr``: a stand-in
    for a run that diverges at a high learning rate and not at a lower one.
    """
    g_update = train.Trainer.g_update

    def poisoned(self, state, key, per_device):
        step = state.step + 1  # the step this update belongs to
        lr = optim.hyperparams(state.g_opt_state)["lr"]
        state, metrics = g_update(self, state, key, per_device)
        bad = (step == at_step) & (lr > above_lr)
        g_params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), state.g_params)
        return state.replace(g_params=g_params), metrics

    monkeypatch.setattr(train.Trainer, "g_update", poisoned)


def test_nan_weights_stop_training_at_their_step(monkeypatch, tmp_path):
    poison_generator(monkeypatch, at_step=5)
    config = tiny_ring(total_steps=9, log_every=100)  # no log line at step 5
    with pytest.raises(loop.Diverged) as error:
        loop.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert error.value.step == 5
    assert message.startswith("training diverged at step 5: g_params hold NaN")
    assert "the last checkpoint, step 3, is intact" in message
    assert "divergence_rollbacks" in message
    # The checkpoint of step 6 was never written: nothing diverged is saved.
    assert steps_of(tmp_path) == [3]
    state, _, _ = restore(tmp_path, 3)
    assert all(np.isfinite(x).all() for x in arrays(state))


def test_divergence_rolls_back_with_a_lower_learning_rate(
    monkeypatch, tmp_path, capsys
):
    lr = 2e-4
    poison_generator(monkeypatch, at_step=5, above_lr=lr / 2)
    config = tiny_ring(total_steps=9, divergence_rollbacks=2)
    config.divergence_lr_factor = 0.25
    state = loop.train_and_evaluate(config, str(tmp_path))

    out = capsys.readouterr().out
    assert "warning: training diverged at step 5: g_params hold NaN" in out
    assert "rolled back to step 3 with the learning rate lowered to 5e-05" in out
    assert int(state.step) == 9
    assert all(np.isfinite(x).all() for x in arrays(state))
    for opt_state in (state.g_opt_state, state.d_opt_state):
        np.testing.assert_allclose(optim.hyperparams(opt_state)["lr"], lr * 0.25)
    # The log holds each step once: the diverged steps were truncated away.
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
    assert logged == sorted(set(logged))


def test_a_diverging_command_exits_nonzero_and_keeps_its_checkpoint(tmp_path):
    # A real divergence: Adam steps of size 1e30 overflow float32 at once.
    workdir = tmp_path / "run"
    result = run_main([*RING_FLAGS, f"--workdir={workdir}", "--config.total_steps=3"])
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_main(
        [
            *RING_FLAGS,
            f"--workdir={workdir}",
            "--config.total_steps=9",
            "--config.optimizer.lr=1e30",
            "--config.allow_config_change=True",
        ]
    )
    assert result.returncode == 1
    assert "error: training diverged at step 4:" in result.stderr
    assert "the last checkpoint, step 3, is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert steps_of(workdir) == [3]


def test_a_changed_learning_rate_takes_effect_on_resume(tmp_path):
    loop.train_and_evaluate(tiny_ring(total_steps=3), str(tmp_path))
    changed = tiny_ring(total_steps=4, allow_config_change=True)
    changed.optimizer.lr = 5e-5
    state = loop.train_and_evaluate(changed, str(tmp_path))
    for opt_state in (state.g_opt_state, state.d_opt_state):
        np.testing.assert_allclose(optim.hyperparams(opt_state)["lr"], 5e-5)


# Config errors, before anything is compiled or written.


def flat_png_folder(path, count=4, size=32):
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
        Image.fromarray(pixels).save(path / f"{i}.png")
    return path


def bad_configs(tmp_path):
    """(description, config, words the error must contain)."""
    typo = tiny_ring()
    typo.optimizer.b3 = 0.9  # a field no code reads
    # A config file that builds its ConfigDict from a dict escapes
    # ml_collections' own type checks on assignment.
    fields = tiny_ring().to_dict()
    fields["model"]["ch"] = "32"
    wrong_type = ml_collections.ConfigDict(fields)
    uneven = tiny_ring(batch_size=30)
    size = tiny_ring()
    size.dataset.name = "image_folder"
    size.dataset.path = str(flat_png_folder(tmp_path / "flat"))
    size.model.update(name="sndcgan", image_size=40, channels=3)
    unlabeled = tiny_ring()
    unlabeled.dataset.name = "image_folder"
    unlabeled.dataset.path = size.dataset.path
    unlabeled.model.update(name="resnet", image_size=32, channels=3, num_classes=10)
    return [
        ("unknown field", typo, ["unknown config field optimizer.b3", "optimizer.b"]),
        ("wrong type", wrong_type, ["model.ch must be of type int", "'32' (str)"]),
        ("uneven batch", uneven, ["not divisible by the 4 devices"]),
        ("image size", size, ["for image sizes [32, 48]", "image_size=40"]),
        ("no labels", unlabeled, ["has no labels", "num_classes=0"]),
    ]


def test_bad_configs_stop_before_any_compilation(tmp_path):
    for name, config, words in bad_configs(tmp_path):
        workdir = tmp_path / name.replace(" ", "_")
        with CompileCounter() as compiles:
            with pytest.raises(validate.ConfigError) as error:
                loop.train_and_evaluate(config, str(workdir))
        for word in words:
            assert word in str(error.value), (name, str(error.value))
        assert compiles.count == 0, name
        assert not workdir.exists(), name


@pytest.mark.parametrize(
    "flag,words",
    [
        ("--config.n_dsi=2", ["unknown config field n_dsi", "did you mean n_dis"]),
        ("--config.optimizer.lr=fast", ["optimizer.lr", "fast"]),
        ("--config.model=3", ["model"]),
        ("--config.model.image_size=20", ["image_size=20", "[8, 16]"]),
    ],
    ids=["typo", "type", "group", "image-size"],
)
def test_bad_overrides_give_one_error_line(tmp_path, flag, words):
    result = run_main(
        ["--config=configs/default.py", f"--workdir={tmp_path / 'run'}", flag]
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors and errors[-1].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in errors[-1], errors[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# Bad data.


@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            ["--config.dataset.name=image_folder", "--config.dataset.path={missing}"],
            ["does not exist"],
        ),
        (
            ["--config.dataset.name=image_folder", "--config.dataset.path={empty}"],
            ["no images"],
        ),
        (["--config.dataset.name=cifar01"], ["did you mean", "cifar10"]),
        (["--config.dataset.name=image_folder"], ["dataset.path"]),
    ],
    ids=["missing-folder", "empty-folder", "unknown-tfds-name", "no-path"],
)
def test_bad_data_gives_one_error_line(tmp_path, overrides, words):
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty"}
    overrides = [o.format(**names) for o in overrides]
    result = run_main(
        [
            "--config=configs/cifar10_sndcgan.py",
            f"--workdir={tmp_path / 'run'}",
            *overrides,
        ]
    )
    assert result.returncode == 1
    assert result.stderr.count("error: ") == 1, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    for word in words:
        assert word in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# The disk.


def test_an_unwritable_workdir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with CompileCounter() as compiles:
        with pytest.raises(checkpoints.CheckpointError) as error:
            loop.train_and_evaluate(tiny_ring(), str(blocker / "run"))
    assert "cannot write to the workdir" in str(error.value)
    assert "--workdir" in str(error.value)
    assert compiles.count == 0
    assert blocker.read_text() == "not a folder"


# Sets the limit, then becomes the training command. The kernel then refuses
# every write past the limit of a file (EFBIG), as it refuses writes to a full
# disk (ENOSPC): the closest a test can come to a full disk without root.
# SIGXFSZ is ignored so that the write fails instead of killing the process.
LIMITED = """if True:
    import os, resource, signal, sys
    limit = int(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    os.execv(sys.executable, [sys.executable, "-m", "sngan_jax.main", *sys.argv[2:]])
"""


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    workdir = tmp_path / "run"
    result = run_main([*RING_FLAGS, f"--workdir={workdir}", "--config.total_steps=3"])
    assert result.returncode == 0, result.stderr[-2000:]
    before = restore(workdir, 3)[0]

    # The checkpoint files of this model take more than 8 kB; the log lines
    # and config stay far below that.
    limited = [sys.executable, "-c", LIMITED, "8000"]
    result = subprocess.run(
        [*limited, *RING_FLAGS, f"--workdir={workdir}", "--config.total_steps=9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert "could not write the checkpoint of step 6" in line
    assert "File too large" in line
    assert "the checkpoint at step 3 is intact" in line
    assert "Event loop is closed" not in result.stderr

    # The earlier checkpoint still restores, whole; the next run (with room
    # on the disk again) resumes from it and cleans nothing it should keep.
    assert steps_of(workdir) == [3]
    assert_same_arrays(restore(workdir, 3)[0], before)
    result = run_main([*RING_FLAGS, f"--workdir={workdir}", "--config.total_steps=6"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unfinished checkpoint save" in result.stdout
    assert "resumed from the checkpoint at step 3" in result.stdout
    assert steps_of(workdir) == [3, 6]
