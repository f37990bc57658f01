"""STL-10 (unlabeled split, 48x48) with the paper's ResNet."""

from configs import cifar10_resnet


def get_config():
    config = cifar10_resnet.get_config()
    config.dataset.name = "stl10"
    config.model.image_size = 48
    return config
