"""Turning samples into pictures: image grids and scatter plots of 2-D points."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Generator output in [-1, 1] to uint8 in [0, 255]."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def image_grid(
    images: np.ndarray, ncol: int | None = None, pad: int = 1, scale: int = 1
) -> Image.Image:
    """Tiles images ``(N, H, W, C)`` (uint8, or float in [-1, 1]) into one PIL image.

    ``ncol`` defaults to the smallest square that fits; grey images (C = 1)
    give a grey picture; ``scale`` enlarges each pixel to a square of that
    many pixels (for small images). Renders inline in Jupyter.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1 or 3), got shape {images.shape}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def scatter_image(
    points: np.ndarray,
    reference: np.ndarray | None = None,
    extent: float = 5.0,
    size: int = 384,
) -> Image.Image:
    """Draws 2-D points (black) over optional reference points (red) as an image.

    The square ``[-extent, extent]^2`` maps onto ``size x size`` pixels.
    """
    canvas = np.full((size, size, 3), 255, np.uint8)

    def draw(pts, color, radius):
        pts = np.asarray(pts, np.float64)
        pix = np.round((pts + extent) / (2 * extent) * (size - 1)).astype(int)
        pix[:, 1] = size - 1 - pix[:, 1]  # y grows upwards in the plot
        inside = np.all((pix >= 0) & (pix < size), axis=1)
        for x, y in pix[inside]:
            canvas[
                max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1
            ] = color

    if reference is not None:
        draw(reference, (220, 40, 40), 3)
    draw(points, (0, 0, 0), 0)
    return Image.fromarray(canvas)
