"""Generators and discriminators, chosen by ``config.model.name``.

Every generator is called as ``g(z, labels=None, train=True)`` and returns
images ``(N, S, S, C)`` in [-1, 1] (points ``(N, 2)`` for the MLP); every
discriminator as ``d(x, labels=None, update_stats=True)`` and returns logits
``(N,)``. ``update_stats`` is true only in a discriminator update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from sngan_jax.models.dcgan import DCGANDiscriminator, DCGANGenerator
from sngan_jax.models.resnet import ResNetDiscriminator, ResNetGenerator
from sngan_jax.models.small import (
    MLPDiscriminator,
    MLPGenerator,
    SmallDiscriminator,
    SmallGenerator,
)

MODELS = ("sndcgan", "resnet", "small", "mlp")


def build(
    model: Mapping[str, Any], *, axis_name: str | None = None
) -> tuple[nn.Module, nn.Module]:
    """Builds ``(generator, discriminator)`` from ``config.model``.

    ``axis_name`` names the device axis for batch-norm statistics; pass it when
    the networks run inside ``pmap`` or ``shard_map`` and None elsewhere.
    """
    name = model["name"]
    d_opts = dict(
        norm=model["d_norm"], axis_name=axis_name, sn_init_steps=model["sn_init_steps"]
    )
    if name == "mlp":
        g = MLPGenerator(hidden=model["ch"], depth=model["depth"], out_dim=2)
        return g, MLPDiscriminator(hidden=model["ch"], depth=model["depth"], **d_opts)
    size, ch = model["image_size"], model["ch"]
    if name == "small":
        g = SmallGenerator(size, ch, channels=model["channels"], axis_name=axis_name)
        return g, SmallDiscriminator(size, ch, **d_opts)
    if name == "sndcgan":
        g = DCGANGenerator(
            size, ch, model["z_dim"], channels=model["channels"], axis_name=axis_name
        )
        return g, DCGANDiscriminator(size, ch, **d_opts)
    if name == "resnet":
        classes = model["num_classes"]
        g = ResNetGenerator(size, ch, model["z_dim"], classes, axis_name=axis_name)
        d = ResNetDiscriminator(
            size, ch, classes, conditioning=model["conditioning"], **d_opts
        )
        return g, d
    raise ValueError(f"unknown model.name {name!r}; choose one of {MODELS}")
