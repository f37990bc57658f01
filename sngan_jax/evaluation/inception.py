"""The Inception-v3 network of FID, in Flax, and its input preprocessing.

FID and the Inception Score are only comparable across papers when every
implementation feeds images through the same network in the same way. This
module reproduces the network that pytorch-fid uses, itself a port of the
TensorFlow graph of December 2015 that the original FID code loads. It is
torchvision's Inception-v3 with three differences that the TensorFlow graph
has and later Inception-v3 releases do not:

- 1008 output classes instead of 1000, and no auxiliary classifier;
- the average pools inside the blocks of type A, C and the first E divide by
  the number of real pixels under the window, never counting the padding;
- the last E block (``Mixed_7c``) pools its fourth branch with a max pool.

Every convolution is followed by batch norm (epsilon 0.001) with its running
statistics, and a ReLU. Submodules carry the names of the torch state dict
(``Mixed_5b/branch1x1/conv``), so converting published weights is a renaming
(see ``weights``). Kernels are HWIO. The network only ever runs in inference,
so the batch-norm statistics are plain parameters in ``"params"``.

Precision: convolutions and matrix products use JAX's default precision. On
CPUs that is full float32. On GPUs the default lets XLA use TF32 for float32
convolutions, which changes features slightly; wrap the call in
``jax.default_matmul_precision("highest")`` when they must match a float32
reference. The resize in ``preprocess`` always runs at full precision.

``preprocess`` brings images of any size to the 299x299 input in [-1, 1] with
the same bilinear resize as pytorch-fid (torch's ``F.interpolate``,
``align_corners=False``, no antialiasing).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Height and width of the images the network was trained on.
INPUT_SIZE = 299
# The TensorFlow graph's classes: ImageNet's 1000 plus 8 unused ones.
NUM_CLASSES = 1008
# Width of the pool features that FID compares.
POOL_FEATURES = 2048
BATCH_NORM_EPS = 1e-3


class BatchNorm(nn.Module):
    """Inference-only batch norm whose running statistics are parameters."""

    eps: float = BATCH_NORM_EPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes ``x`` (..., C) with the stored mean and variance."""
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = self.param("mean", nn.initializers.zeros, (channels,))
        var = self.param("var", nn.initializers.ones, (channels,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """Convolution without bias, then batch norm and ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H', W', features)."""
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            name="conv",
        )(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 average that ignores the zero padding (TensorFlow's rule)."""
    return nn.avg_pool(
        x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
    )


def _max_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 max pool, padded so the size is kept."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: Array) -> Array:
    """3x3 stride-2 max pool without padding: (N, H, W, C) -> about half size."""
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """Block 5 (35x35): 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, 35, 35, C) -> (N, 35, 35, 224 + pool_features)."""
        branch1x1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)

        branch5x5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(
            branch5x5
        )

        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        for i in (2, 3):
            branch3x3dbl = BasicConv2d(
                96, (3, 3), padding=(1, 1), name=f"branch3x3dbl_{i}"
            )(branch3x3dbl)

        branch_pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(
            _avg_pool_3x3(x)
        )
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nn.Module):
    """Reduction from 35x35 to 17x17 (``Mixed_6a``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, 35, 35, C) -> (N, 17, 17, 480 + C)."""
        branch3x3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)

        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(
            branch3x3dbl
        )
        branch3x3dbl = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(
            branch3x3dbl
        )
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_s2(x)], -1)


class InceptionC(nn.Module):
    """Block 6 (17x17): 7x7 convolutions factorized into 1x7 and 7x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, 17, 17, C) -> (N, 17, 17, 768)."""
        c7 = self.channels_7x7
        row = {"kernel_size": (1, 7), "padding": (0, 3)}
        col = {"kernel_size": (7, 1), "padding": (3, 0)}
        branch1x1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)

        branch7x7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, **row, name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, **col, name="branch7x7_3")(branch7x7)

        # Alternates 7x1 and 1x7, ending in the block's 192 output channels.
        shapes = [(c7, col), (c7, row), (c7, col), (192, row)]
        branch7x7dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        for i, (features, shape) in enumerate(shapes, start=2):
            branch7x7dbl = BasicConv2d(features, **shape, name=f"branch7x7dbl_{i}")(
                branch7x7dbl
            )

        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nn.Module):
    """Reduction from 17x17 to 8x8 (``Mixed_7a``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, 17, 17, C) -> (N, 8, 8, 512 + C)."""
        branch3x3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)

        branch7x7x3 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(
            branch7x7x3
        )
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(
            branch7x7x3
        )
        branch7x7x3 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(
            branch7x7x3
        )
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_s2(x)], -1)


class InceptionE(nn.Module):
    """Block 7 (8x8): 3x3 convolutions split into parallel 1x3 and 3x1."""

    # "avg" in Mixed_7b, "max" in Mixed_7c: a quirk of the TensorFlow graph.
    pool: str = "avg"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, 8, 8, C) -> (N, 8, 8, 2048)."""
        branch1x1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)

        branch3x3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = self._split(branch3x3, "branch3x3_2")

        branch3x3dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(
            branch3x3dbl
        )
        branch3x3dbl = self._split(branch3x3dbl, "branch3x3dbl_3")

        pooled = _max_pool_3x3(x) if self.pool == "max" else _avg_pool_3x3(x)
        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], -1)

    def _split(self, x: Array, name: str) -> Array:
        """A 1x3 and a 3x1 convolution side by side: (N, H, W, C) -> 768 channels."""
        a = BasicConv2d(384, (1, 3), padding=(0, 1), name=f"{name}a")(x)
        b = BasicConv2d(384, (3, 1), padding=(1, 0), name=f"{name}b")(x)
        return jnp.concatenate([a, b], -1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: pool features and logits of 299x299 images."""

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        """Images (N, 299, 299, 3) in [-1, 1] -> features.

        Returns ``pool`` (N, 2048), the features of FID and KID; ``logits``
        (N, 1008); and ``logits_unbiased`` (N, 1008), the logits without the
        classifier's bias, which the original Inception Score code used.
        Smaller inputs work down to 75x75, but only 299x299 gives the
        published features; see ``preprocess``.
        """
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)

        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels_7x7 in [
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ]:
            x = InceptionC(channels_7x7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)

        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, name="fc")
        logits = fc(pool)
        logits_unbiased = pool @ fc.variables["params"]["kernel"]
        return {"pool": pool, "logits": logits, "logits_unbiased": logits_unbiased}


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Torch's bilinear resize of one axis as a matrix (out_size, in_size).

    Follows ``F.interpolate(mode="bilinear", align_corners=False)`` without
    antialiasing: output pixel i samples the input at (i + 0.5) * in / out - 0.5,
    clamped below at 0, between its two nearest pixels; at the upper edge both
    neighbours are the last pixel. Torch computes the coordinate in float32
    with one fused multiply-add; float64 rounded once to float32 gives the
    same bits.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centers = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * centers - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lower = src.astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = np.clip(src - lower.astype(np.float32), 0, 1)

    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    matrix[rows, lower] += 1 - frac
    matrix[rows, upper] += frac
    matrix.flags.writeable = False  # Shared by every caller through the cache.
    return matrix


def _resize(x: Array, size: int) -> Array:
    """Bilinear resize of (N, H, W, C) to (N, size, size, C), torch's way."""
    height, width = x.shape[1:3]
    # Exact float32 products: the matrices are constants, the cost is small.
    highest = jax.lax.Precision.HIGHEST
    if height != size:
        rows = bilinear_matrix(height, size)
        x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=highest)
    if width != size:
        cols = bilinear_matrix(width, size)
        x = jnp.einsum("ow,nhwc->nhoc", cols, x, precision=highest)
    return x


def preprocess(images: Array | np.ndarray, size: int = INPUT_SIZE) -> Array:
    """Images (N, H, W, 1 or 3) -> network input (N, size, size, 3) in [-1, 1].

    Integer images are read as 0..255, floating ones as [-1, 1]. As in
    pytorch-fid, the image is resized in [0, 1] (bilinear, no antialiasing;
    no resampling when it is already size x size) and then mapped to [-1, 1].
    Grayscale is repeated to three channels. Jittable.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1 or 3), got {images.shape}")
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) / 255.0
    else:
        x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = _resize(x, size)
    x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    return 2.0 * x - 1.0
