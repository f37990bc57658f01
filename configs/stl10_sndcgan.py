"""STL-10 (unlabeled split, 48x48) with the standard CNN, Adam settings A-F.

``--config=configs/stl10_sndcgan.py:C`` picks the paper's setting C.
"""

from configs import cifar10_sndcgan


def get_config(setting: str = "C"):
    config = cifar10_sndcgan.get_config(setting)
    config.dataset.name = "stl10"
    config.model.image_size = 48
    return config
