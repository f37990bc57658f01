"""The paper's robustness study on the ring of 8 Gaussians: Adam settings A-F
(Table 1) crossed with six discriminators (spectral, weight, layer and batch
normalization, gradient penalty, none): 36 points.

    python -m sngan_jax.sweep --config=configs/robustness_ring2d.py \\
        --workdir=runs/robustness_ring2d

Each point is the ring2d run, shortened; the summary reports the modes covered
and the share of high-quality samples at the end.
"""

from configs import common, ring2d


def get_config():
    config = ring2d.get_config()
    config.total_steps = 4000
    config.log_every = 250
    config.sample_every = 2000  # modes are scored at 2000 and 4000 steps
    config.checkpoint_every = 2000
    config.keep_checkpoints = 1
    return config


def get_sweep():
    return common.robustness_sweep()
