"""The default run: 8x8 handwritten digits that ship with scikit-learn.

Real images with no download; an SN discriminator and a small generator. Trains
to recognizable digits in a few minutes on a 2-core CPU.
"""

from configs import common


def get_config():
    config = common.base()
    config.batch_size = 64
    config.total_steps = 4000
    config.n_dis = 1
    config.ema_decay = 0.999
    config.log_every = 200
    config.sample_every = 1000
    config.checkpoint_every = 1000
    config.eval_every = 1000  # digits FID/IS and classes covered (offline)

    config.dataset.name = "digits"

    config.model.name = "small"
    config.model.image_size = 8
    config.model.channels = 1
    config.model.ch = 32

    config.optimizer.lr = 2e-4
    config.optimizer.b1 = 0.5
    config.optimizer.b2 = 0.999
    config.optimizer.decay = "none"
    return config
