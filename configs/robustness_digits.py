"""The paper's robustness study on the embedded digits: Adam settings A-F
crossed with six discriminators (spectral, weight, layer and batch
normalization, gradient penalty, none): 36 points.

    python -m sngan_jax.sweep --config=configs/robustness_digits.py \\
        --workdir=runs/robustness_digits

Each point is the default digits run at half the width (``model.ch=16``),
shortened to 1,000 steps and without EMA (the paper scores the raw
generator), so that the 36 points take about 20 minutes on 2 CPU cores; it is
scored once at the end with the digits classifier (FID, IS, classes covered).
"""

from configs import common, default


def get_config():
    config = default.get_config()
    config.total_steps = 1000
    config.ema_decay = 0.0
    config.model.ch = 16
    config.log_every = 250
    config.sample_every = 1000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 1
    config.eval_every = 1000
    return config


def get_sweep():
    return common.robustness_sweep()
