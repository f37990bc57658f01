"""8 Gaussians on a circle of radius 2 (std 0.02): the GAN stability test bed.

An MLP generator and an SN MLP discriminator; about a minute on a CPU. The
sample PNGs show the generated points over the mode centres, and
metrics.jsonl records how many modes are covered.
"""

from configs import common


def get_config():
    config = common.base()
    config.batch_size = 256
    config.total_steps = 5000
    config.n_dis = 5
    config.log_every = 250
    config.sample_every = 1000
    config.checkpoint_every = 1000

    config.dataset.name = "ring2d"

    config.model.name = "mlp"
    config.model.ch = 128  # hidden units per layer
    config.model.depth = 3
    config.model.z_dim = 16

    config.optimizer.lr = 2e-4
    config.optimizer.b1 = 0.5
    config.optimizer.b2 = 0.9
    config.optimizer.decay = "none"
    return config
