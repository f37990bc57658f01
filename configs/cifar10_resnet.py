"""CIFAR-10 with the paper's ResNet: hinge loss, n_dis 5, lr 2e-4 decayed to 0.

Adam betas (0, 0.9), batch 64, 50k generator updates (the common defaults,
which ``common.base`` holds).
"""

from configs import common


def get_config():
    config = common.base()
    config.dataset.name = "cifar10"
    config.model.name = "resnet"
    config.model.image_size = 32
    return config
