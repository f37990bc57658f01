#!/usr/bin/env bash
# Table 2 of the paper: standard CNN (SNDCGAN), hinge loss, setting C, on STL-10 at 48x48.
# The paper reports IS 8.79, FID 43.2
# (IS of 5,000 samples; FID of 5,000 against 10,000 real images).
# Usage: experiments/reproduce/stl10_sndcgan.sh [WORKDIR] [extra training flags...]
set -euo pipefail
workdir=${1:-runs/reproduce/stl10_sndcgan}
shift || true
exec "$(dirname "$0")/_run.sh" configs/stl10_sndcgan.py:C "$workdir" "$@"
