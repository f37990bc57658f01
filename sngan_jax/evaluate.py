"""Scoring a trained run: ``python -m sngan_jax.evaluate --workdir=DIR``.

Scores a checkpoint (the latest by default) under a protocol, prints the
scores with their protocol, and writes them to ``<workdir>/eval/<step>.json``
and ``<workdir>/metrics.jsonl``. The metrics are the data set's usual ones
(Inception FID/IS/KID for images, classifier scores for the digits, modes for
the 2-D mixtures) unless ``--metrics`` names others. A metric family that
cannot run (no Inception weights offline) is reported with what to do, the
others are still computed, and the exit status is 1.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from sngan_jax import compiler, data, runs, writers
from sngan_jax.evaluation import evaluator, protocol, records

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (the --workdir of training).")
flags.DEFINE_integer("step", None, "Checkpoint step to score; default: the latest.")
flags.DEFINE_bool("best", False, "Score the best checkpoint (<workdir>/best).")
flags.DEFINE_enum("protocol", "paper", sorted(protocol.PROTOCOLS), "See README.")
flags.DEFINE_enum(
    "generator", "", ["", "ema", "raw"], "Default: ema if the run has it."
)
flags.DEFINE_list("metrics", [], "inception, digits, toy; default: the data set's.")
flags.DEFINE_integer("num_generated", 0, "Override the protocol's sample count.")
flags.DEFINE_string("real_split", "", "tfds split of the real images.")
flags.DEFINE_string(
    "inception_weights", "", "Inception weights file (.pth/.pickle/.npz)."
)
flags.DEFINE_string("data_dir", "", "tfds data directory, if not the run's.")
flags.DEFINE_bool("download", True, "Download Inception weights when missing.")
flags.DEFINE_bool(
    "verify_weights", True, "Refuse Inception weights whose checksum is unknown."
)
flags.DEFINE_integer("batch_per_device", 0, "Images per device per feature batch.")
compiler.define_cache_flag()
flags.mark_flags_as_required(["workdir"])
# The flags passed on to score().
OPTIONS = (
    "step",
    "best",
    "protocol",
    "generator",
    "metrics",
    "num_generated",
    "real_split",
    "inception_weights",
    "data_dir",
    "download",
    "verify_weights",
    "batch_per_device",
)


def score(workdir: str, **options) -> dict:
    """Scores a run's checkpoint; returns the record also written to the workdir.

    ``options`` are the flags of this command (``step``, ``protocol``, ...).
    """
    run = runs.load(workdir, options.get("step"), **_run_args(options))
    config = _eval_config(run, options)
    generator = "raw" if not run.ema or run.state.get("g_ema_params") is None else "ema"
    scorer = evaluator.Evaluator(
        config,
        families=options.get("metrics") or None,
        download=options.get("download", True),
    )
    for family, reason in scorer.prepare().items():
        print(f"error: {family} metrics unavailable: {reason}", file=sys.stderr)
    record = scorer.evaluate(run.generate, run.step, generator)
    target = run.workdir
    records.write(target, record)
    writer = writers.MetricWriter(target)
    writer.write_scalars(run.step, records.scalars(record))
    writer.close()
    return record


def _run_args(options: dict) -> dict:
    args = {"ema": options.get("generator") != "raw"}
    if options.get("best"):
        args["best"] = True
    return args


def _eval_config(run: runs.Run, options: dict):
    config = runs.with_defaults(run.config)
    with config.unlocked():
        # Sample counts come from the named protocol (or these flags), not from
        # the run's evaluation during training, which may have used fewer.
        config.eval.num_generated = config.eval.num_real = 0
        for key in (
            "protocol",
            "generator",
            "real_split",
            "num_generated",
            "inception_weights",
            "batch_per_device",
        ):
            if options.get(key):
                config.eval[key] = options[key]
        if options.get("verify_weights") is False:
            config.eval.verify_weights = False
        if options.get("data_dir"):
            config.dataset.data_dir = options["data_dir"]
    return config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compiler.cache_if_flagged()
    options = {name: FLAGS[name].value for name in OPTIONS}
    try:
        record = score(FLAGS.workdir, **options)
    except (FileNotFoundError, ValueError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(evaluator.summary(record))
    print(f"written to {records.eval_path(FLAGS.workdir, record['step'])}")
    if record["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
