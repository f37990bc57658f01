"""A learning-rate sweep on the ring of 8 Gaussians: six rates, one command.

    python -m sngan_jax.sweep --config=configs/lr_sweep_ring2d.py \\
        --workdir=runs/lr_sweep

The points differ only in ``optimizer.lr``, so they train together in one
vectorized program (``--vectorize=false`` trains them one by one).
"""

from configs import ring2d

LEARNING_RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def get_config():
    config = ring2d.get_config()
    config.total_steps = 2000
    config.sample_every = 2000
    config.checkpoint_every = 2000
    return config


def get_sweep():
    return [{"labels": {"lr": lr}, "optimizer.lr": lr} for lr in LEARNING_RATES]
