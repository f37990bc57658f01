"""The paper's robustness study on CIFAR-10 (its Figure 1 and Table 1): the
standard CNN with Adam settings A-F crossed with six discriminators (spectral,
weight, layer and batch normalization, gradient penalty, none): 36 points of
100k steps each, for accelerators.

    python -m sngan_jax.sweep --config=configs/robustness_cifar10.py \\
        --workdir=runs/robustness_cifar10

Every point is scored with the Inception Score and FID of the paper's protocol
every 10k steps and at the end (needs the Inception weights, see README).
"""

from configs import cifar10_sndcgan, common


def get_config():
    config = cifar10_sndcgan.get_config()
    config.eval_every = 10_000
    return config


def get_sweep():
    return common.robustness_sweep()
