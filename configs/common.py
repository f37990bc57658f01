"""The fields every config has, with their defaults, and the paper's Adam table.

Other configs start from ``base()`` and override only what differs.
"""

import ml_collections

# Table 1 of the paper: the Adam settings of the robustness study.
# name: (learning rate, beta1, beta2, n_dis)
ADAM_SETTINGS = {
    "A": (1e-4, 0.5, 0.9, 5),
    "B": (1e-4, 0.5, 0.999, 1),
    "C": (2e-4, 0.5, 0.999, 1),
    "D": (1e-3, 0.5, 0.9, 5),
    "E": (1e-3, 0.5, 0.999, 5),
    "F": (1e-3, 0.9, 0.999, 5),
}


def base() -> ml_collections.ConfigDict:
    """Defaults shared by all configs (the paper's ResNet optimizer settings)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds the weights, the latents and the data order
    config.batch_size = 64  # global batch, split evenly over all devices
    config.total_steps = 50_000  # generator updates
    config.n_dis = 5  # discriminator updates per generator update
    config.ema_decay = 0.0  # EMA of generator weights; 0 turns it off
    config.log_every = 100  # steps between metric lines
    config.sample_every = 1000  # steps between sample grids
    config.checkpoint_every = 1000  # steps between checkpoints
    config.keep_checkpoints = 3  # how many recent checkpoints to keep
    config.allow_config_change = False  # resume a workdir despite a changed config
    config.divergence_rollbacks = 0  # on NaN/Inf: roll back this often; 0 = stop
    config.divergence_lr_factor = 0.5  # each roll-back multiplies the lr by this
    config.eval_every = 0  # steps between evaluations (FID etc.); 0 = never

    config.eval = ml_collections.ConfigDict()
    config.eval.protocol = "paper"  # paper (5k vs 10k test) or 50k (50k vs train)
    config.eval.metrics = ""  # inception, digits, toy (comma-separated); empty = usual
    config.eval.generator = ""  # ema or raw weights; empty = ema when the run has one
    config.eval.real_split = ""  # tfds split of the real images; empty = protocol's
    config.eval.num_generated = 0  # samples to score; 0 = the protocol's count
    config.eval.num_real = 0  # real images (at most); 0 = the protocol's count
    config.eval.inception_weights = ""  # .pth/.pickle/.npz path; empty = cache/download
    config.eval.verify_weights = True  # refuse Inception weights of unknown checksum
    config.eval.batch_per_device = 100  # images per device in each feature batch
    config.eval.best_metric = ""  # lower is better; picks best/; empty = the first FID

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = (
        "cifar10"  # a tfds name, image_folder, or digits/ring2d/grid2d
    )
    config.dataset.split = ""  # tfds split; empty: train (stl10: unlabelled)
    config.dataset.data_dir = ""  # tfds data directory; empty: tfds's default
    config.dataset.path = ""  # image_folder: the directory of images
    config.dataset.cache_dir = ""  # image_folder: cache here, not beside the data
    config.dataset.random_flip = False  # mirror real images at random (on device)
    config.dataset.preload_max_gb = 4.0  # tfds: decode into memory up to this size

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet"  # sndcgan, resnet, small or mlp
    config.model.image_size = 32  # pixels; must match the data
    config.model.channels = 3  # image channels; must match the data
    config.model.ch = 64  # width multiplier; 64 gives the paper's widths
    config.model.z_dim = 128  # latent size, z ~ N(0, I)
    config.model.depth = 3  # hidden layers of the MLP models
    config.model.num_classes = 0  # > 0: class-conditional G and D
    config.model.conditioning = "projection"  # conditional D: projection or concat
    config.model.d_norm = "spectral"  # spectral, weight, layer, batch or none
    config.model.sn_init_steps = 15  # power iterations at initialization
    config.model.dtype = "float32"  # activations: float32 or bfloat16 (accelerators)

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "hinge"  # hinge, non_saturating or wasserstein
    config.loss.gp_weight = 0.0  # gradient penalty lambda (10 in the paper); 0 = off

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 2e-4  # Adam learning rate of both networks
    config.optimizer.b1 = 0.0  # Adam beta1
    config.optimizer.b2 = 0.9  # Adam beta2
    config.optimizer.eps = 1e-8  # Adam epsilon
    config.optimizer.decay = "linear"  # linear (to 0 at total_steps) or none
    config.optimizer.clip_weights = 0.0  # clip D weights to [-c, c]; 0 = off
    return config


def apply_setting(config: ml_collections.ConfigDict, setting: str) -> None:
    """Sets lr, betas and n_dis to one of the paper's settings A-F (in place)."""
    if setting not in ADAM_SETTINGS:
        raise ValueError(
            f"unknown Adam setting {setting!r}; the paper's are {sorted(ADAM_SETTINGS)}"
        )
    lr, b1, b2, n_dis = ADAM_SETTINGS[setting]
    config.optimizer.lr, config.optimizer.b1, config.optimizer.b2 = lr, b1, b2
    config.n_dis = n_dis
    config.optimizer.decay = "none"


# The discriminator normalizations the paper compares, as config overrides.
# Gradient penalty (WGAN-GP) pairs the penalty with the Wasserstein loss and
# no normalization; the others keep the config's loss.
METHODS = {
    "spectral": {"model.d_norm": "spectral"},
    "weight": {"model.d_norm": "weight"},
    "layer": {"model.d_norm": "layer"},
    "batch": {"model.d_norm": "batch"},
    "gp": {"model.d_norm": "none", "loss.name": "wasserstein", "loss.gp_weight": 10.0},
    "none": {"model.d_norm": "none"},
}


def setting_overrides(setting: str) -> dict:
    """Adam setting A-F of the paper's Table 1 as sweep overrides."""
    lr, b1, b2, n_dis = ADAM_SETTINGS[setting]
    return {
        "optimizer.lr": lr,
        "optimizer.b1": b1,
        "optimizer.b2": b2,
        "n_dis": n_dis,
        "optimizer.decay": "none",
    }


def robustness_sweep() -> list[dict]:
    """Settings A-F crossed with every method of ``METHODS``: 36 points."""
    return [
        {
            "labels": {"setting": setting, "method": method},
            **setting_overrides(setting),
            **overrides,
        }
        for method, overrides in METHODS.items()
        for setting in ADAM_SETTINGS
    ]
