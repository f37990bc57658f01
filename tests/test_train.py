"""The training step and loop: device counts, power iterations, resumption."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default, ring2d
from sngan_jax import checkpoints, data, layers, loop, spectral, train
from sngan_jax.measure import CompileCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ring(**overrides):
    config = ring2d.get_config()
    config.batch_size = 32
    config.total_steps = 6
    config.model.ch = 32
    config.log_every = 2
    config.sample_every = 3
    config.checkpoint_every = 3
    config.update(overrides)
    return config


def tiny_digits(**overrides):
    config = default.get_config()
    config.batch_size = 16
    config.total_steps = 4
    config.n_dis = 2
    config.model.ch = 8
    config.log_every = 2
    config.sample_every = 4
    config.checkpoint_every = 2
    config.update(overrides)
    return config


def assert_trees_close(a, b, rtol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.max(np.abs(y)))


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(x, y)


# Adam divides each gradient entry by its own running magnitude, so an entry
# whose true gradient is near zero gets a step of order lr whose sign is
# decided by float rounding, and 1 and 4 devices sum their gradients in
# different orders. A larger epsilon bounds that amplification; it does not
# touch what is under test (that the sharded step computes the same function).
# test_gradients_agree_across_device_counts checks the default settings.
DEVICE_TEST_EPS = 1e-3


@pytest.mark.parametrize(
    "make_config", [tiny_ring, tiny_digits], ids=["ring", "digits"]
)
def test_one_device_and_four_devices_agree(make_config, tmp_path):
    config = make_config()
    config.optimizer.eps = DEVICE_TEST_EPS
    # Flips are drawn per global batch too; mirrored digits are fine here.
    config.dataset.random_flip = config.dataset.name == "digits"
    one = loop.train_and_evaluate(
        config, str(tmp_path / "one"), jax.local_devices()[:1]
    )
    four = loop.train_and_evaluate(config, str(tmp_path / "four"), jax.local_devices())
    assert int(one.step) == int(four.step) == config.total_steps
    # Parameters must have moved, or agreeing would prove nothing.
    init = train.Trainer(config).init_state(config.seed)
    assert not np.allclose(
        jax.tree.leaves(one.d_params)[0], jax.tree.leaves(init.d_params)[0]
    )
    for field in ("g_params", "d_params", "d_spectral", "g_batch_stats"):
        assert_trees_close(getattr(one, field), getattr(four, field), rtol=1e-5)


def test_gradients_agree_across_device_counts():
    config = tiny_digits()
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    stream, _ = data.create(config.dataset, config.batch_size, config.seed)
    real = next(stream)["images"]

    def grads(state, real):
        z, _ = trainer.draw_latents(jax.random.PRNGKey(3), real.shape[0])
        fake = trainer.generate(state, z, None)
        real = data.to_model_input(real)
        args = (state.d_params, state.d_spectral, real, None, fake, None, None)
        g, _ = jax.grad(trainer.d_loss, has_aux=True)(*args)
        return jax.lax.pmean(g, train.AXIS)

    results = []
    for n in (1, 4):
        p_grads = jax.pmap(grads, train.AXIS, devices=jax.local_devices()[:n])
        shards = real.reshape(n, -1, *real.shape[1:])
        results.append(train.unreplicate(p_grads(train.replicate(state, n), shards)))
    assert_trees_close(results[0], results[1], rtol=1e-5)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(results[0])) > 1e-3


def test_spectral_vectors_stay_identical_across_devices():
    config = tiny_ring()
    trainer = train.Trainer(config)
    n = jax.local_device_count()
    state = train.replicate(trainer.init_state(0), n)
    p_step = train.pmap_train_step(trainer)
    rng = np.random.default_rng(0)
    per_device = config.batch_size // n
    for _ in range(4):
        # Different data on every device.
        images = rng.normal(size=(n, config.n_dis, per_device, 2)).astype(np.float32)
        state, _ = p_step(state, {"images": images})
    for leaf in jax.tree.leaves(state.d_spectral):
        copies = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(copies) == n
        for copy in copies[1:]:
            assert np.array_equal(copy, copies[0])
    # The discriminator parameters did train on that data.
    assert float(state.step[0]) == 4


def test_one_discriminator_update_runs_exactly_one_power_iteration(monkeypatch):
    config = tiny_digits(n_dis=1)
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    calls = []
    real_power_iteration = spectral.power_iteration

    def counting(w, u, n_steps=1, eps=1e-12):
        calls.append(n_steps)
        return real_power_iteration(w, u, n_steps, eps)

    monkeypatch.setattr(spectral, "power_iteration", counting)
    images = np.zeros((16, 8, 8, 1), np.uint8)
    key = jax.random.PRNGKey(1)
    new_state, _ = jax.vmap(
        lambda s: trainer.d_update(s, {"images": images}, key), axis_name=train.AXIS
    )(jax.tree.map(lambda x: x[None], state))
    num_layers = len(layers.spectral_sigmas(state.d_spectral))
    # One call per normalized layer, each of one step, for a batch of 32
    # (16 real + 16 fake) images.
    assert calls == [1] * num_layers

    # And the stored vector is that one step from the old one, nothing more.
    flat_old = jax.tree_util.tree_flatten_with_path(state.d_spectral)[0]
    new_spectral = jax.tree.map(lambda x: x[0], new_state.d_spectral)
    for path, u_old in flat_old:
        if path[-1].key != "u":
            continue
        layer = [p.key for p in path[:-1]]
        kernel = state.d_params
        for key_ in layer:
            kernel = kernel[key_]
        u_new = new_spectral
        for key_ in layer:
            u_new = u_new[key_]
        expected, _ = real_power_iteration(kernel["kernel"], u_old, 1)
        np.testing.assert_allclose(u_new["u"], expected, rtol=1e-6, atol=1e-7)


def test_fakes_drawn_together_equal_fakes_drawn_per_update():
    # With n_dis > 1 the step draws every update's fakes in one vmapped
    # generator pass; each update must see the fakes it would draw itself,
    # with its own batch-norm statistics, and train to the same state.
    config = tiny_digits(n_dis=3)
    trainer = train.Trainer(config)
    state = jax.tree.map(lambda x: x[None], trainer.init_state(0))
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    images = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), np.uint8)

    def per_update(state):
        fakes = []
        for key in keys:
            z, labels = trainer.draw_latents(jax.random.split(key, 3)[0], 16)
            fakes.append(trainer.generate(state, z, labels))
            state, _ = trainer.d_update(state, {"images": images}, key)
        return fakes, state

    def together(state):
        fakes, labels = trainer.generate_all(state, keys, 16)
        for i, key in enumerate(keys):
            mine = (fakes[i], None if labels is None else labels[i])
            state, _ = trainer.d_update(state, {"images": images}, key, mine)
        return fakes, state

    want = jax.vmap(per_update, axis_name=train.AXIS)(state)
    got = jax.vmap(together, axis_name=train.AXIS)(state)
    assert np.shape(got[0]) == (1, 3, 16, 8, 8, 1)
    for i in range(3):
        np.testing.assert_allclose(got[0][0, i], want[0][i][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[0][0, 0], got[0][0, 1])  # fresh latents each update
    assert_trees_close(got[1], want[1], rtol=1e-5)


def test_generator_update_leaves_the_spectral_state_alone():
    config = tiny_ring()
    trainer = train.Trainer(config)
    state = jax.tree.map(lambda x: x[None], trainer.init_state(0))
    new_state, _ = jax.vmap(
        lambda s: trainer.g_update(s, jax.random.PRNGKey(0), 32), axis_name=train.AXIS
    )(state)
    assert_trees_equal(new_state.d_spectral, state.d_spectral)
    assert not np.array_equal(
        jax.tree.leaves(new_state.g_params)[0], jax.tree.leaves(state.g_params)[0]
    )


def restore_final(workdir):
    ckpt = checkpoints.Checkpointer(workdir)
    state, data_state, config = ckpt.restore(ckpt.latest_step())
    ckpt.close()
    return state, data_state


def test_resume_in_a_new_process_gives_identical_weights(tmp_path):
    config = tiny_digits(total_steps=6, checkpoint_every=3, keep_checkpoints=3)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))

    # A second run stopped right after its step-3 checkpoint: copy the
    # workdir and delete the later checkpoint, then resume in a new process.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")
    args = [
        sys.executable,
        "-m",
        "sngan_jax.main",
        "--config=configs/default.py",
        f"--workdir={resumed_dir}",
    ]
    args += [f"--config.{k}={v}" for k, v in flat_overrides(config).items()]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step 3" in result.stdout

    resumed, data_state = restore_final(str(resumed_dir))
    assert int(resumed["step"]) == 6
    assert data_state["batches"] == 6 * config.n_dis
    for field in (
        "g_params",
        "g_batch_stats",
        "g_ema_params",
        "d_params",
        "d_spectral",
    ):
        assert_trees_equal(resumed[field], getattr(straight, field))
    assert_trees_equal(resumed["g_opt_state"], straight.g_opt_state)
    assert_trees_equal(resumed["d_opt_state"], straight.d_opt_state)


def flat_overrides(config):
    """The fields tiny_digits changed from the default config, flattened."""
    base = default.get_config().to_dict()
    out = {}

    def walk(new, old, prefix):
        for key, value in new.items():
            if isinstance(value, dict):
                walk(value, old[key], f"{prefix}{key}.")
            elif value != old[key]:
                out[prefix + key] = value

    walk(config.to_dict(), base, "")
    return out


def test_training_rejects_a_batch_the_devices_cannot_share(tmp_path):
    from sngan_jax.validate import ConfigError

    with pytest.raises(ConfigError, match="not divisible by the 4 devices"):
        loop.train_and_evaluate(tiny_ring(batch_size=30), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_ema_follows_the_generator():
    config = tiny_digits(ema_decay=0.5)
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    g = jax.tree.map(lambda p: p + 1.0, state.g_params)
    ema = trainer._ema(state.g_ema_params, g)
    leaf = jax.tree.leaves(ema)[0]
    np.testing.assert_allclose(
        leaf, jax.tree.leaves(state.g_params)[0] + 0.5, rtol=1e-6
    )
    assert train.Trainer(tiny_ring()).init_state(0).g_ema_params is None


def test_shard_batches_splits_each_batch_across_devices():
    batches = [{"images": np.arange(8) + 10 * i} for i in range(3)]
    out = train.shard_batches(batches, 4)["images"]
    assert out.shape == (4, 3, 2)
    assert out[1, 2].tolist() == [22, 23]  # device 1, third D update


def test_steps_after_the_first_do_not_compile_again():
    config = tiny_ring()
    trainer = train.Trainer(config)
    state = train.to_devices(trainer.init_state(0))
    p_step = train.pmap_train_step(trainer)
    stream, _ = data.create(config.dataset, config.batch_size, config.seed)
    n = jax.local_device_count()
    with CompileCounter() as compiles:
        state, _ = p_step(state, train.shard_batches([next(stream)] * 5, n))
        first = compiles.count
        for _ in range(3):
            batch = train.shard_batches([next(stream) for _ in range(5)], n)
            state, metrics = p_step(state, batch)
        jax.block_until_ready(metrics)
    assert first >= 1
    assert compiles.count == first


def test_resuming_with_another_config_is_refused_unless_forced(tmp_path):
    from sngan_jax.validate import ConfigError

    loop.train_and_evaluate(tiny_ring(total_steps=2), str(tmp_path))
    saved_json = (tmp_path / "config.json").read_text()

    with pytest.raises(ConfigError) as error:
        loop.train_and_evaluate(tiny_ring(total_steps=4, n_dis=2), str(tmp_path))
    assert "n_dis: 5 -> 2" in str(error.value)
    assert "allow_config_change=True" in str(error.value)
    assert "total_steps" not in str(error.value)  # a longer run is fine
    assert (tmp_path / "config.json").read_text() == saved_json
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == [2]

    forced = tiny_ring(total_steps=4, n_dis=2, allow_config_change=True)
    state = loop.train_and_evaluate(forced, str(tmp_path))
    assert int(state.step) == 4
