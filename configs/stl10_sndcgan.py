"""STL-10 (unlabeled split, 48x48) with the standard CNN, Adam settings A-F.

``--config=configs/stl10_sndcgan.py:C`` picks the paper's setting C.
"""

from configs import cifar10_sndcgan


def get_config(setting: str = "C"):
    config = cifar10_sndcgan.get_config(setting)
    config.dataset.name = "stl10"
    config.model.image_size = 48
    # FID's real images: the unlabelled split the model trains on (the test
    # split has only 8,000 images, fewer than the paper protocol's 10,000).
    config.eval.real_split = "unlabelled"
    return config
