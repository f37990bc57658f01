"""Command line: ``python -m sngan_jax.main --config=configs/default.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.optimizer.lr=1e-3``; a
config that takes an argument is called as ``--config=configs/x.py:ARG``. For
several hosts, start the same command on every host with ``--multihost`` (the
coordinator is found from the cluster environment: Slurm, TPU pods, ...) or
with ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sngan_jax import checkpoints, compiler, data, loop, validate, writers
from sngan_jax.evaluation.evaluator import EvaluationError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path of a config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (several hosts)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (several hosts).")
flags.DEFINE_integer("process_id", None, "This process's index (several hosts).")
compiler.define_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Joins a multi-process run when the flags ask for one."""
    if not (FLAGS.multihost or FLAGS.coordinator_address):
        return
    # Cross-process collectives on CPU need gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        # Library INFO logs (orbax reports every checkpoint at length) would
        # bury the one-line summaries; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    compiler.cache_if_flagged()
    writers.console(
        f"{jax.process_count()} process(es), {jax.device_count()} device(s) in all, "
        f"{jax.local_device_count()} here ({jax.devices()[0].platform})"
    )
    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except loop.Interrupted as e:
        # Not a failure: the run stopped cleanly and resumes where it stopped.
        writers.console(str(e))
    except (
        validate.ConfigError,
        data.DataError,
        EvaluationError,
        FloatingPointError,
        checkpoints.CheckpointError,
    ) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # A bad flag or config override prints one error line, not absl's usage.
    app.run(main, flags_parser=validate.parse_flags)
