#!/usr/bin/env bash
# Shared by the reproduction scripts: train a config, then score the final
# checkpoint with the paper's protocol and print where the scores are.
#   _run.sh CONFIG WORKDIR [extra training flags...]
set -euo pipefail
config=$1
workdir=$(realpath -m "$2")  # before leaving the caller's directory
shift 2
cd "$(dirname "$0")/../.."
python -m sngan_jax.main --config="$config" --workdir="$workdir" \
    --config.eval_every=10000 "$@"
python -m sngan_jax.evaluate --workdir="$workdir" --protocol=paper
echo "scores: $workdir/eval/ (best checkpoint by FID: $workdir/best.json)"
