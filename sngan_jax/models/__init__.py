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
import jax.numpy as jnp

from sngan_jax.models.dcgan import DCGANDiscriminator, DCGANGenerator
from sngan_jax.models.resnet import ResNetDiscriminator, ResNetGenerator
from sngan_jax.models.small import (
    MLPDiscriminator,
    MLPGenerator,
    SmallDiscriminator,
    SmallGenerator,
)

MODELS = ("sndcgan", "resnet", "small", "mlp")
DTYPES = ("float32", "bfloat16")


def build(
    model: Mapping[str, Any], *, axis_name: str | None = None
) -> tuple[nn.Module, nn.Module]:
    """Builds ``(generator, discriminator)`` from ``config.model``.

    ``axis_name`` names the device axis for batch-norm statistics; pass it when
    the networks run inside ``pmap`` or ``shard_map`` and None elsewhere.
    """
    name = model["name"]
    dtype = activation_dtype(model)
    d_opts = dict(
        norm=model["d_norm"],
        axis_name=axis_name,
        sn_init_steps=model["sn_init_steps"],
        dtype=dtype,
    )
    if name == "mlp":
        g = MLPGenerator(model["ch"], model["depth"], out_dim=2, dtype=dtype)
        return g, MLPDiscriminator(hidden=model["ch"], depth=model["depth"], **d_opts)
    size, ch = model["image_size"], model["ch"]
    g_opts = dict(axis_name=axis_name, dtype=dtype)
    if name == "small":
        g = SmallGenerator(size, ch, channels=model["channels"], **g_opts)
        return g, SmallDiscriminator(size, ch, **d_opts)
    if name == "sndcgan":
        g = DCGANGenerator(
            size, ch, model["z_dim"], channels=model["channels"], **g_opts
        )
        return g, DCGANDiscriminator(size, ch, **d_opts)
    if name == "resnet":
        classes = model["num_classes"]
        g = ResNetGenerator(size, ch, model["z_dim"], classes, **g_opts)
        d = ResNetDiscriminator(
            size, ch, classes, conditioning=model["conditioning"], **d_opts
        )
        return g, d
    raise ValueError(f"unknown model.name {name!r}; choose one of {MODELS}")


def activation_dtype(model: Mapping[str, Any]) -> jnp.dtype:
    """The dtype of the networks' activations, ``config.model.dtype``.

    bfloat16 halves the activations' memory and runs the convolutions on the
    bfloat16 units of GPUs and TPUs. Parameters, optimizer state, batch-norm
    statistics, spectral-norm vectors, sigma and the logits stay float32.
    """
    name = model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; choose one of {DTYPES}")
    return jnp.dtype(name)
