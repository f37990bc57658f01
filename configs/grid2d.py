"""25 Gaussians centred on {-4, -2, 0, 2, 4}^2 (std 0.05): the harder test bed."""

from configs import ring2d


def get_config():
    config = ring2d.get_config()
    config.dataset.name = "grid2d"
    return config
