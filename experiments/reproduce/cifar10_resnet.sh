#!/usr/bin/env bash
# Table 2 of the paper: ResNet, hinge loss, on CIFAR-10.
# The paper reports IS 8.22 +- .05, FID 21.7 +- .21
# (IS of 5,000 samples; FID of 5,000 against 10,000 real images).
# Usage: experiments/reproduce/cifar10_resnet.sh [WORKDIR] [extra training flags...]
set -euo pipefail
workdir=${1:-runs/reproduce/cifar10_resnet}
shift || true
exec "$(dirname "$0")/_run.sh" configs/cifar10_resnet.py "$workdir" "$@"
