"""Loading runs for notebooks: another device count, determinism, the notebook."""

import os
import subprocess
import sys
import textwrap

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import sngan_jax
from configs import default, ring2d
from sngan_jax import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny digits run trained on all 4 fake devices, with an EMA."""
    config = default.get_config()
    config.model.ch = 8
    config.batch_size = 16
    config.total_steps = 4
    config.log_every = 2
    config.sample_every = 4
    config.checkpoint_every = 2
    workdir = tmp_path_factory.mktemp("digits")
    assert jax.local_device_count() == 4
    loop.train_and_evaluate(config, str(workdir))
    return workdir


LOAD_ON_ONE_DEVICE = textwrap.dedent(
    """
    import sys, warnings
    import jax, numpy as np
    import sngan_jax
    assert jax.device_count() == 1
    run = sngan_jax.load(sys.argv[1])
    assert run.step == 4 and run.steps_available() == [2, 4]
    a = run.sample(10, seed=7)
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, run.sample(10, seed=7, batch_size=3))
    assert not np.array_equal(a, run.sample(10, seed=8))
    raw = sngan_jax.load(sys.argv[1], ema=False)
    assert not np.array_equal(raw.sample(10, seed=7), a)
    run.load_step(2)
    assert run.step == 2
    assert run.interpolate(5).shape == (5, 8, 8, 1)
    print("ok")
    """
)


def test_a_four_device_run_loads_on_one_device(digits_run):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ON_ONE_DEVICE, str(digits_run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_checkpoints_folder_and_bad_paths(digits_run, tmp_path):
    run = sngan_jax.load(str(digits_run / "checkpoints"), step=2)
    assert run.step == 2 and run.workdir == str(digits_run)
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        sngan_jax.load(str(tmp_path))
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        run.load_step(3)
    with pytest.raises(ValueError, match="not class-conditional"):
        run.sample(2, labels=1)


def test_spectral_table_compares_stored_and_exact_sigma(digits_run):
    run = sngan_jax.load(str(digits_run))
    table = run.spectral_table()
    assert [row["layer"] for row in table] == [
        "SNConv_0",
        "SNConv_1",
        "SNConv_2",
        "SNDense_0",
    ]
    for row in table:
        assert 0 < row["sigma"] <= row["sigma_exact"] * (1 + 1e-5)
        assert row["rel_error"] < 0.1
    spectra = run.singular_values()
    # W / sigma has top singular value sigma_exact / sigma, just above 1.
    for row in table:
        top = spectra[row["layer"]][0]
        assert top == pytest.approx(row["sigma_exact"] / row["sigma"], rel=1e-4)


def test_interpolation_ends_at_the_two_latents(digits_run):
    run = sngan_jax.load(str(digits_run))
    z0, z1 = run.latents(2, seed=5)
    for method in ("spherical", "linear"):
        path = run.interpolate(4, seed=5, method=method)
        assert np.array_equal(path[0], run.generate(z0[None])[0])
        assert np.array_equal(path[-1], run.generate(z1[None])[0])
    with pytest.raises(ValueError, match="spherical"):
        run.interpolate(4, method="cubic")


def test_a_run_without_ema_warns_and_uses_the_raw_weights(tmp_path):
    config = ring2d.get_config()
    config.batch_size = 16
    config.total_steps = 2
    config.log_every = 1
    config.sample_every = 2
    config.checkpoint_every = 2
    loop.train_and_evaluate(config, str(tmp_path))
    with pytest.warns(UserWarning, match="without an EMA"):
        run = sngan_jax.load(str(tmp_path))
    points = run.sample(6, seed=0)
    assert points.shape == (6, 2) and points.dtype == np.float32
    raw = sngan_jax.load(str(tmp_path), ema=False)
    assert np.array_equal(raw.sample(6, seed=0), points)


def test_the_explore_notebook_runs(digits_run, monkeypatch):
    path = os.path.join(REPO, "experiments", "notebooks", "explore_run.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")
    monkeypatch.setenv("SNGAN_WORKDIR", str(digits_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3")
    client.execute(cwd=REPO)  # raises CellExecutionError on any cell error
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_class_conditional_sampling(tmp_path):
    import tensorflow_datasets as tfds

    from configs import cifar10_resnet

    config = cifar10_resnet.get_config()
    config.model.num_classes = 10
    config.model.ch = 2
    config.batch_size = 8
    config.total_steps = 1
    config.log_every = 1
    config.sample_every = 1
    config.checkpoint_every = 1
    with tfds.testing.mock_data(num_examples=16):
        loop.train_and_evaluate(config, str(tmp_path))
    run = sngan_jax.load(str(tmp_path), ema=False)
    same_class = run.sample(4, seed=0, labels=3)
    per_sample = run.sample(4, seed=0, labels=[3, 3, 3, 3])
    assert same_class.shape == (4, 32, 32, 3)
    assert np.array_equal(same_class, per_sample)
    assert not np.array_equal(same_class, run.sample(4, seed=0, labels=7))
    assert np.array_equal(run.sample(4, seed=1), run.sample(4, seed=1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        run.sample(2, labels=10)
