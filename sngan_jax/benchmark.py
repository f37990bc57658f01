"""Training-step benchmark: ``python -m sngan_jax.benchmark --config=...``.

Times the real training iteration of a config: the pmapped step of
``train.py`` (``n_dis`` discriminator updates and one generator update) on all
local devices, fed host batches the way the training loop feeds them, with
each step's metrics read after the next step is dispatched. It reports, per
variant of the discriminator:

- seconds to initialize the train state, and to compile and run the first step;
- steady-state seconds per iteration (the median of ``--rounds`` rounds of
  ``--steps`` iterations, the variants and the peers taking turns), real images
  per second (``n_dis x batch`` per iteration) in total and per device;
- FLOPs of one iteration (XLA's count) and the achieved TFLOP/s, with the
  model-FLOPs utilization where the chip's peak is known (``--peak_tflops``);
- peak device memory (accelerators) or the process's peak resident memory (CPU);
- compilations during the timed steps (0 when nothing recompiles).

    python -m sngan_jax.benchmark --config=configs/cifar10_sndcgan.py \\
        --variants=config,none,gp --steps=10 --rounds=3 \\
        --torch_peer=../shared/bench/torch_sndcgan.py --torch_python=torchenv/bin/python

Variants: ``config`` (as configured), ``none`` (no discriminator
normalization), ``gp`` (no normalization, Wasserstein loss and gradient penalty
10, as WGAN-GP). Images are random unless ``--real_data``; the data pipeline
has its own benchmark (``python -m sngan_jax.data.benchmark``). The peers are
the side-by-side programs of the paper's standard CNN (PyTorch and stock Flax):
they run in the same invocation, in the same rounds, with the same batch and
``n_dis``, and the table gives our time as a ratio to each one's.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sngan_jax import loop, measure, peers, train, validate

FLAGS = flags.FLAGS

VARIANTS = ("config", "none", "gp")


class Result(NamedTuple):
    """One variant's measurements; times in seconds, memory in bytes."""

    name: str
    init_s: float
    first_step_s: float
    since_start_s: float | None  # process start to the end of the first step
    step_s: float  # the median over rounds
    round_step_s: list[float]  # seconds per iteration in each round
    images_per_s: float
    images_per_s_per_device: float
    flops: float | None  # of one iteration, all devices together
    tflops_per_s: float | None
    mfu: float | None
    peak_memory: int | None
    memory_kind: str
    compilations: int


def variant_config(config: ml_collections.ConfigDict, variant: str):
    """``config`` with its discriminator normalization swapped as ``variant`` says."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    config = ml_collections.ConfigDict(config.to_dict())
    if variant in ("none", "gp"):
        config.model.d_norm = "none"
    if variant == "gp":
        config.loss.name = "wasserstein"
        config.loss.gp_weight = 10.0
    return config


def random_batches(config, num_batches: int, seed: int = 0) -> list[dict]:
    """Process batches of random uint8 images (and labels) of the model's shape."""
    rng = np.random.default_rng(seed)
    per_process = config.batch_size // jax.process_count()
    model = config.model
    if model.name == "mlp":
        shape, dtype = (2,), np.float32
    else:
        shape, dtype = (model.image_size, model.image_size, model.channels), np.uint8
    out = []
    for _ in range(num_batches):
        if dtype == np.uint8:
            images = rng.integers(0, 256, (per_process, *shape), np.uint8)
        else:
            images = rng.standard_normal((per_process, *shape)).astype(dtype)
        batch = {"images": images}
        if model.num_classes:
            batch["labels"] = rng.integers(0, model.num_classes, per_process, np.int32)
        out.append(batch)
    return out


class Timer:
    """One variant, compiled and warmed up, ready to be timed in rounds.

    ``first``: this is the process's first variant, so the time from the
    process's start to the end of the first step (imports, initialization,
    compilation) is recorded too.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        name: str = "config",
        warmup: int = 2,
        real_data: bool = False,
        first: bool = True,
    ):
        validate.check(config, jax.device_count())
        self.config, self.name = config, name
        self.next_batches = _batch_source(config, real_data)
        self.compiles = measure.CompileCounter()
        self.rounds: list[float] = []

        start = time.perf_counter()
        trainer = train.Trainer(config)
        state = train.to_devices(jax.device_get(trainer.init_state(config.seed)))
        jax.block_until_ready(state)
        self.init_s = time.perf_counter() - start

        self.p_step = train.pmap_train_step(trainer)
        start = time.perf_counter()
        state, metrics = self.p_step(state, self.next_batches())
        jax.block_until_ready(metrics)
        self.first_step_s = time.perf_counter() - start
        self.since_start = measure.process_age() if first else None

        for _ in range(warmup):
            state, metrics = self.p_step(state, self.next_batches())
        jax.block_until_ready(metrics)
        self.state, self.metrics = state, metrics
        self.flops = measure.flops(self.p_step, state, self.next_batches())

    def time_round(self, steps: int) -> float:
        """Runs ``steps`` iterations as the training loop does; seconds each."""
        with self.compiles:
            start = time.perf_counter()
            state, pending = self.state, self.metrics
            for _ in range(steps):
                state, metrics = self.p_step(state, self.next_batches())
                # The loop reads the previous step's metrics, from device 0.
                float(np.asarray(pending["d_loss"].addressable_data(0))[0])
                pending = metrics
            jax.block_until_ready((state, pending))
            step_s = (time.perf_counter() - start) / steps
        self.state, self.metrics = state, pending
        self.rounds.append(step_s)
        return step_s

    def result(self, peak_tflops: float | None = None) -> Result:
        step_s = float(np.median(self.rounds))
        images_per_s = self.config.batch_size * self.config.n_dis / step_s
        tflops = self.flops / step_s / 1e12 if self.flops else None
        peak = peak_tflops or measure.peak_tflops()
        memory, memory_kind = measure.peak_memory()
        num_devices = jax.local_device_count()
        return Result(
            name=self.name,
            init_s=self.init_s,
            first_step_s=self.first_step_s,
            since_start_s=self.since_start,
            step_s=step_s,
            round_step_s=list(self.rounds),
            images_per_s=images_per_s,
            images_per_s_per_device=images_per_s / num_devices,
            flops=self.flops,
            tflops_per_s=tflops,
            mfu=tflops / (peak * num_devices) if tflops and peak else None,
            peak_memory=memory,
            memory_kind=memory_kind,
            compilations=self.compiles.count,
        )


def _batch_source(config, real_data: bool) -> Callable[[], dict]:
    """A function returning the next step's sharded batches, made as the loop does."""
    num_local = jax.local_device_count()
    if real_data:
        stream, info = loop.open_data(config)
        validate.check_data(config, info)
        return lambda: train.shard_batches(
            [next(stream) for _ in range(config.n_dis)], num_local
        )
    # A few fixed batches in turn: the host still stacks, splits and transfers
    # them every step, as it does with real data.
    pool = random_batches(config, 2 * config.n_dis)
    turn = iter(range(sys.maxsize))

    def next_batches():
        i = next(turn) % 2
        chosen = pool[i * config.n_dis : (i + 1) * config.n_dis]
        return train.shard_batches(chosen, num_local)

    return next_batches


def format_table(config, results: list[Result], peer_results: list[peers.Peer]) -> str:
    """The results as a fixed-width table, then the peers' ratios."""
    devices = jax.local_devices()
    rounds = len(results[0].round_step_s) if results else 0
    lines = [
        f"{config.model.name} {config.model.image_size}px, batch {config.batch_size}, "
        f"n_dis {config.n_dis}, dtype {config.model.get('dtype', 'float32')}, "
        f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
        f"s/iter: median of {rounds} interleaved round(s)",
        f"{'variant':<8} {'init s':>7} {'1st step s':>10} {'start->1st':>10} "
        f"{'s/iter':>8} {'img/s':>8} {'/device':>8} {'GFLOP':>8} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'memory':>12} {'compiles':>8}",
    ]
    for r in results:
        memory = f"{r.peak_memory / 2**20:,.0f} MiB" if r.peak_memory else "-"
        lines.append(
            f"{r.name:<8} {r.init_s:>7.2f} {r.first_step_s:>10.2f} "
            f"{_num(r.since_start_s, '.1f'):>10} {r.step_s:>8.4f} "
            f"{r.images_per_s:>8.1f} {r.images_per_s_per_device:>8.1f} "
            f"{_num(r.flops and r.flops / 1e9, ',.1f'):>8} "
            f"{_num(r.tflops_per_s, '.3f'):>8} {_num(r.mfu, '.1%'):>6} "
            f"{memory:>12} {r.compilations:>8}"
        )
    lines.append(f"memory: {results[0].memory_kind}" if results else "")
    by_name = {r.name: r for r in results}
    for peer in peer_results:
        if peer.step_s is None:
            lines.append(f"{peer.name} ({peer.variant}): {peer.detail}")
            continue
        ours = by_name[peer.variant].step_s
        lines.append(
            f"{peer.name} ({peer.variant}): {peer.step_s:.4f} s/iter; ours / "
            f"{peer.name} = {ours / peer.step_s:.2f}"
        )
    if "config" in by_name and "none" in by_name:
        ratio = by_name["config"].step_s / by_name["none"].step_s
        lines.append(f"config / none (normalization overhead) = {ratio:.3f}")
    if "config" in by_name and "gp" in by_name:
        ratio = by_name["gp"].step_s / by_name["config"].step_s
        lines.append(f"gp / config = {ratio:.3f}")
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # as sngan_jax.main
    config = FLAGS.config
    if FLAGS.steps < 1 or FLAGS.rounds < 1:
        raise app.UsageError("--steps and --rounds must be at least 1")

    # Every variant is compiled first; then the variants and the peers take
    # turns, round after round, so that a slow spell of a shared machine
    # touches them all alike. Each reports its median round.
    timers = []
    for variant in FLAGS.variants:
        cfg = variant_config(config, variant)
        timers.append(Timer(cfg, variant, FLAGS.warmup, FLAGS.real_data, not timers))
    peer_runs = _peer_commands(config)
    peer_times: dict[tuple[str, str], list] = {key: [] for key in peer_runs}
    peer_detail: dict[tuple[str, str], str] = {}
    for _ in range(FLAGS.rounds):
        for timer in timers:
            timer.time_round(FLAGS.steps)
        for key, command in peer_runs.items():
            step_s, peer_detail[key] = peers.run_peer(command)
            if step_s is not None:
                peer_times[key].append(step_s)

    results = [timer.result(FLAGS.peak_tflops) for timer in timers]
    peer_results = [
        peers.Peer(
            name,
            variant,
            float(np.median(times)) if times else None,
            times,
            peer_detail.get((name, variant), ""),
        )
        for (name, variant), times in peer_times.items()
    ]
    print(format_table(config, results, peer_results))
    if jax.config.jax_compilation_cache_dir:
        # The commands keep one; the benchmark reads one only when JAX is told.
        print(
            "persistent compilation cache on (JAX_COMPILATION_CACHE_DIR): the "
            "start figures may be those of a warm start"
        )
    if FLAGS.json:
        report = {
            "results": [r._asdict() for r in results],
            "peers": [p._asdict() for p in peer_results],
            "device": jax.devices()[0].device_kind,
            "num_devices": jax.local_device_count(),
        }
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)


def _peer_commands(config) -> dict[tuple[str, str], list[str]]:
    """The peer programs to run, by (peer name, variant)."""
    programs = []
    if FLAGS.torch_peer:
        programs.append(("torch", [FLAGS.torch_python or "python", FLAGS.torch_peer]))
    if FLAGS.flax_peer:
        programs.append(("flax-stock", [sys.executable, FLAGS.flax_peer]))
    commands = {}
    for variant in FLAGS.variants:
        args = peers.peer_args(variant_config(config, variant), variant, FLAGS.steps)
        if args is None:
            continue
        for name, program in programs:
            commands[(name, variant)] = program + args
    return commands


def define_flags() -> None:
    """Defines the command's flags.

    Only when run as a command, so that tests and the other commands can import
    this module beside flags of their own.
    """
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed iterations per variant and round.")
    flags.DEFINE_integer("rounds", 3, "Rounds; variants and peers take turns.")
    flags.DEFINE_integer("warmup", 2, "Untimed iterations after the first.")
    flags.DEFINE_list("variants", ["config"], "Any of config, none, gp.")
    flags.DEFINE_bool("real_data", False, "Feed the config's data set, not noise.")
    flags.DEFINE_string("torch_peer", None, "Path of the PyTorch peer program.")
    flags.DEFINE_string("torch_python", None, "Python that runs the PyTorch peer.")
    flags.DEFINE_string("flax_peer", None, "Path of the stock Flax peer program.")
    flags.DEFINE_float("peak_tflops", None, "The chip's peak TFLOP/s, for MFU.")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
