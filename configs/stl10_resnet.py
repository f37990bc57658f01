"""STL-10 (unlabeled split, 48x48) with the paper's ResNet."""

from configs import cifar10_resnet


def get_config():
    config = cifar10_resnet.get_config()
    config.dataset.name = "stl10"
    config.model.image_size = 48
    # FID's real images: the unlabelled split the model trains on (the test
    # split has only 8,000 images, fewer than the paper protocol's 10,000).
    config.eval.real_split = "unlabelled"
    return config
