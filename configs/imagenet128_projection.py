"""ImageNet 128x128, class-conditional: ResNet with a projection discriminator.

Conditional batch norm in the generator, the projection term in the
discriminator (Miyato and Koyama, 2018); 450k generator updates as in that
paper. ``--config=configs/imagenet128_projection.py:concat`` gives the SN-GAN
paper's concat discriminator instead.
"""

from configs import common


def get_config(conditioning: str = "projection"):
    config = common.base()
    config.total_steps = 450_000
    config.dataset.name = "imagenet2012"
    config.model.name = "resnet"
    config.model.image_size = 128
    config.model.num_classes = 1000
    config.model.conditioning = conditioning
    return config
