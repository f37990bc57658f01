"""Performance features: mixed precision, no recompilation, the benchmark command.

Speed itself is measured by ``python -m sngan_jax.benchmark``, never by a
timed test; these tests check that the fast paths compute what they should.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_resnet, cifar10_sndcgan, ring2d
from sngan_jax import layers, loop, peers, train
from sngan_jax.measure import CompileCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_image_config(base, dtype):
    config = base.get_config()
    config.batch_size = 8
    config.model.ch = 8
    config.model.dtype = dtype
    return config


def random_batch(config, num_devices):
    rng = np.random.default_rng(0)
    shape = (config.batch_size, 32, 32, 3)
    batches = [
        {"images": rng.integers(0, 256, shape, np.uint8)} for _ in range(config.n_dis)
    ]
    return train.shard_batches(batches, num_devices)


@pytest.mark.parametrize(
    "base", [cifar10_sndcgan, cifar10_resnet], ids=["cnn", "resnet"]
)
def test_bfloat16_activations_keep_the_state_in_float32(base):
    """bfloat16 runs the convolutions; parameters, statistics and u stay float32."""
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_image_config(base, dtype)
        trainer = train.Trainer(config)
        state = trainer.init_state(0)
        z = jax.random.normal(jax.random.PRNGKey(1), (8, config.model.z_dim))
        images = trainer.sample(state.g_params, state.g_batch_stats, z)
        d_vars = {"params": state.d_params, layers.SPECTRAL: state.d_spectral}
        logits = trainer.d_local.apply(d_vars, images, None, update_stats=False)
        outputs[dtype] = (images, logits)

    # A training step in bfloat16 (the float32 step is what every other test
    # trains with).
    state = train.to_devices(state)
    p_step = train.pmap_train_step(trainer)
    state, metrics = p_step(state, random_batch(config, jax.local_device_count()))
    host = train.unreplicate(state)
    for field in ("g_params", "g_batch_stats", "d_params", "d_spectral"):
        dtypes = {x.dtype for x in jax.tree.leaves(getattr(host, field))}
        assert dtypes == {np.dtype(np.float32)}, (field, dtypes)
    scalars = {k: float(v[0]) for k, v in metrics.items()}
    assert all(np.isfinite(v) for v in scalars.values()), scalars
    assert scalars["d_params_finite"] == 1.0

    (images32, logits32), (images16, logits16) = outputs["float32"], outputs["bfloat16"]
    assert images16.dtype == jnp.float32 and logits16.dtype == jnp.float32
    # Same weights, same function, within bfloat16's 8 bits of mantissa.
    np.testing.assert_allclose(images16, images32, atol=0.06)
    scale = float(jnp.max(jnp.abs(logits32)))
    np.testing.assert_allclose(logits16, logits32, atol=0.06 * scale)
    assert not np.array_equal(images16, images32)  # bfloat16 did run


def count_compilations(fn):
    with CompileCounter() as compiles:
        fn()
    return compiles.count


def test_the_training_loop_compiles_nothing_per_step(tmp_path):
    """A run of 12 steps compiles exactly what a run of 4 steps compiles."""

    def run(steps, name):
        config = ring2d.get_config()
        config.update(batch_size=32, total_steps=steps, log_every=2)
        config.update(sample_every=4, checkpoint_every=4)
        config.model.ch = 16
        return lambda: loop.train_and_evaluate(config, str(tmp_path / name))

    run(4, "warm")()  # caches of jax's own helpers, outside the comparison
    short = count_compilations(run(4, "short"))
    long = count_compilations(run(12, "long"))
    assert short >= 1
    assert long == short


def test_the_benchmark_command_times_each_variant(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        sys.executable,
        "-m",
        "sngan_jax.benchmark",
        "--config=configs/default.py",
        "--steps=2",
        "--rounds=2",
        "--warmup=1",
        "--variants=config,none,gp",
        f"--json={out}",
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "small 8px, batch 64, n_dis 1" in table
    assert "median of 2 interleaved round(s)" in table
    assert "config / none (normalization overhead) =" in table
    assert "gp / config =" in table

    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["config", "none", "gp"]
    for r in report["results"]:
        assert len(r["round_step_s"]) == 2
        assert r["step_s"] == pytest.approx(np.median(r["round_step_s"]))
        assert r["first_step_s"] > 0
        assert r["images_per_s"] == pytest.approx(64 / r["step_s"])
        assert r["compilations"] == 0  # steady state: nothing recompiles
        assert r["flops"] and r["flops"] > 0
    assert report["results"][0]["since_start_s"] > report["results"][0]["first_step_s"]
    assert report["peers"] == []


def test_peers_get_the_configs_batch_and_n_dis_and_report_their_time(tmp_path):
    config = cifar10_sndcgan.get_config("A")  # n_dis 5
    assert peers.peer_args(config, "config", 7) == ["64", "7", "5"]
    assert peers.peer_args(config, "none", 7) == ["64", "7", "5", "--no-sn"]
    assert peers.peer_args(config, "gp", 7) is None  # the peers have no GP
    assert peers.peer_args(cifar10_resnet.get_config(), "config", 7) is None

    peer = tmp_path / "peer.py"
    peer.write_text("import sys\nprint('peer', sys.argv[1:], 's/iter=0.25')\n")
    step_s, line = peers.run_peer([sys.executable, str(peer), "64", "3", "1"])
    assert step_s == 0.25 and "['64', '3', '1']" in line
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit('no torch here')\n")
    step_s, line = peers.run_peer([sys.executable, str(broken)])
    assert step_s is None and line == "failed: no torch here"


def test_benchmark_variants_change_only_the_normalization():
    from sngan_jax import benchmark

    config = cifar10_sndcgan.get_config()
    none = benchmark.variant_config(config, "none")
    gp = benchmark.variant_config(config, "gp")
    assert config.model.d_norm == "spectral" and none.model.d_norm == "none"
    assert (gp.model.d_norm, gp.loss.name, gp.loss.gp_weight) == (
        "none",
        "wasserstein",
        10.0,
    )
    assert none.optimizer.to_dict() == config.optimizer.to_dict()
    with pytest.raises(ValueError, match="unknown variant"):
        benchmark.variant_config(config, "fast")


def test_random_benchmark_batches_have_the_data_shapes():
    from sngan_jax import benchmark

    config = cifar10_resnet.get_config()
    config.model.num_classes = 10
    (batch,) = benchmark.random_batches(config, 1)
    assert batch["images"].shape == (64, 32, 32, 3)
    assert batch["images"].dtype == np.uint8
    assert batch["labels"].shape == (64,) and batch["labels"].max() < 10
    points = benchmark.random_batches(ring2d.get_config(), 1)[0]["images"]
    assert points.shape == (ring2d.get_config().batch_size, 2)
    assert points.dtype == np.float32


def test_cpu_programs_compile_with_xla_convolutions_not_ynnpack():
    # jaxlib 0.10 sends CPU convolutions to YNNPACK, slower on these networks;
    # our pmapped and jitted programs keep them in XLA, others are untouched.
    from sngan_jax import compiler

    assert compiler.options("cpu") == compiler.CPU_OPTIONS
    assert compiler.options("gpu") == {}
    x, kernel = jnp.ones((1, 8, 16, 16, 32)), jnp.ones((1, 3, 3, 32, 32)) / 300

    def conv(x, kernel):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=dn
        )

    def uses_ynnpack(lowered):
        return "__ynn_fusion" in lowered.compile().as_text()

    ours = compiler.pmap(conv)
    assert uses_ynnpack(jax.pmap(conv).lower(x, kernel))  # XLA's default here
    np.testing.assert_allclose(ours(x, kernel), jax.pmap(conv)(x, kernel), rtol=1e-6)
    (program,) = ours._programs.values()
    assert "__ynn_fusion" not in program.as_text()
    jitted = compiler.jit(conv)
    assert "__ynn_fusion" not in jitted.lower(x[0], kernel[0]).compile().as_text()
