"""Small figure helpers shared by the notebooks, train.py and sample.py.

Images are NHWC arrays, either in the model's range [-1, 1] (floats) or uint8.
"""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (floats) or already uint8 -> uint8 in [0, 255], shape (N, H, W, C)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return images if images.ndim == 4 else images[..., None]


def image_grid(images, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images into one uint8 array of shape (rows*H, ncols*W, C), with ``pad`` pixels between them."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = image
    return grid


def show_grid(ax, images, ncols: int, title: str | None = None):
    """Draw ``image_grid(images, ncols)`` on a matplotlib axis, without ticks."""
    grid = image_grid(images, ncols)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def show_row(axes, images, labels, ylabel: str | None = None):
    """One image per axis, each titled by its label; ``ylabel`` names the row."""
    images = to_uint8(images)
    for ax, image, label in zip(axes, images, labels):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9)
    if ylabel:
        axes[0].set_ylabel(ylabel)
