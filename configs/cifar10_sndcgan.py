"""CIFAR-10 with the paper's standard CNN (SNDCGAN), one of the Adam settings A-F.

Pick the setting of the paper's Table 1 on the command line:
``--config=configs/cifar10_sndcgan.py:C`` (default C: lr 2e-4, betas 0.5 and
0.999, n_dis 1). The learning rate stays constant.
"""

from configs import common


def get_config(setting: str = "C"):
    config = common.base()
    config.total_steps = 100_000
    common.apply_setting(config, setting)

    config.dataset.name = "cifar10"

    config.model.name = "sndcgan"
    config.model.image_size = 32
    return config
