"""Preemption: a real training process killed at random moments resumes exactly.

Each run is ``python -m sngan_jax.main`` on a tiny digits config with four
fake devices. SIGTERM and SIGINT must leave a checkpoint of the step in flight
and exit 0; SIGKILL (no chance to save) may lose only the steps since the last
checkpoint. Resumed again and again, the run must end with exactly the weights
of an uninterrupted one: the data position and the random key are in the
checkpoint, and every random draw depends only on the step.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sngan_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 200
CHECKPOINT_EVERY = 10
OVERRIDES = {
    "total_steps": TOTAL_STEPS,
    "batch_size": 16,
    "model.ch": 8,
    "log_every": 1,  # a line per step shows how far a run got
    "checkpoint_every": CHECKPOINT_EVERY,
    "sample_every": 1000,
    "eval_every": 0,
}


def command(workdir) -> list[str]:
    args = [sys.executable, "-m", "sngan_jax.main", "--config=configs/default.py"]
    args.append(f"--workdir={workdir}")
    return args + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The test's environment plus a compilation cache shared by its processes.

    The cache only saves compile time in the later processes: a cached program
    is the same program, so it cannot hide a difference in the results.
    """
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The final checkpoint and metrics of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(
        command(workdir), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return final_checkpoint(workdir), losses(workdir)


def final_checkpoint(workdir):
    ckpt = checkpoints.Checkpointer(str(workdir))
    assert ckpt.latest_step() == TOTAL_STEPS
    state, data_state, _ = ckpt.restore(TOTAL_STEPS)
    ckpt.close()
    return state, data_state


def losses(workdir) -> dict[int, tuple]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: (r["d_loss"], r["g_loss"]) for r in records if "d_loss" in r}


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def interrupt(workdir, env, signum, delay: float) -> tuple[int, int, float, str]:
    """Starts the run, sends ``signum`` ``delay`` seconds into training.

    Returns the exit code, the last step the run logged, the seconds from the
    signal to the exit, and the output.
    """
    process = subprocess.Popen(
        command(workdir),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = []
    for line in process.stdout:  # waits until training has begun
        lines.append(line)
        if line.startswith("step "):
            break
    time.sleep(delay)
    process.send_signal(signum)
    sent = time.perf_counter()
    rest, _ = process.communicate(timeout=120)
    seconds = time.perf_counter() - sent
    output = "".join(lines) + rest
    logged = [int(step) for step in re.findall(r"^step (\d+)/", output, re.M)]
    return process.returncode, max(logged, default=0), seconds, output


def test_killed_and_resumed_runs_end_with_the_uninterrupted_weights(
    tmp_path, env, reference
):
    (ref_state, ref_data), ref_losses = reference
    workdir = tmp_path / "run"
    rng = random.Random(0)
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT]
    for signum in plan:
        # Each run gets at most a few dozen steps done, far from the end.
        code, logged, seconds, output = interrupt(
            workdir, env, signum, rng.uniform(0.0, 0.6)
        )
        ckpt = checkpoints.Checkpointer(str(workdir))
        latest = ckpt.latest_step()
        ckpt.close()
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL
            # The newest checkpoint may still have been in writing: then the
            # one before it is the latest.
            assert latest is not None and latest >= logged - 2 * CHECKPOINT_EVERY
        else:
            name = signal.Signals(signum).name
            assert code == 0, output[-2000:]
            assert f"stopped by {name} at step {latest}" in output
            assert latest >= logged  # the step in flight is saved, not lost
            assert seconds < 20

    result = subprocess.run(
        command(workdir), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step" in result.stdout

    state, data_state = final_checkpoint(workdir)
    assert data_state == ref_data
    ref_arrays, arrays = flat(ref_state), flat(state)
    assert arrays.keys() == ref_arrays.keys()
    for key, value in ref_arrays.items():
        assert np.array_equal(arrays[key], value), key
    # Every step logged once, with the losses of the uninterrupted run.
    assert losses(workdir) == ref_losses


def test_a_second_signal_ends_the_process_at_once():
    # The first signal only asks to stop; the second must not wait for a save.
    code = """if True:
        import os, signal, time
        from sngan_jax import loop
        with loop.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            print("asked", stop.signal, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            print("still running", flush=True)
    """
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    assert result.stdout == "asked SIGTERM\n"
    assert result.returncode == -signal.SIGTERM
