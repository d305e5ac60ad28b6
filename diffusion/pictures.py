"""Arrays, pixels and pictures: grids, figures, PNG and GIF files, and the images a user hands in.

Images are NHWC arrays, either in the model's range [-1, 1] (floats) or uint8
pixels. Here they become grids (``image_grid``), matplotlib panels
(``show_grid``, ``show_row``), PNG files that carry text such as a
generation's settings (``png_bytes``, ``png_text``), animated GIFs
(``gif_bytes``) and strips of a denoising trajectory (``trajectory_strip``);
and image files become model inputs (``load_image``, ``load_mask``), with a
``GenerationError`` that says what to do when one does not fit.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from diffusion import data
from diffusion.errors import GenerationError

CHANNELS = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # Pillow mode -> channels


# --- Arrays to pixels and grids -------------------------------------------------------------


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (floats) or already uint8 -> uint8 in [0, 255], shape (N, H, W, C)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return images if images.ndim == 4 else images[..., None]


def as_saved(images) -> np.ndarray:
    """Images in [-1, 1] as a PNG keeps them: rounded to 8 bits, float32 in the model's range again."""
    return data.scale_pixels(to_uint8(images))


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


def _squeeze_grey(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 1) -> (H, W): how Pillow and matplotlib take a grey image; colour stays (H, W, 3)."""
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def to_pil(pixels: np.ndarray) -> Image.Image:
    """A uint8 (H, W, C) picture as a Pillow image (grey "L" for one channel)."""
    return Image.fromarray(_squeeze_grey(pixels))


# --- Figures ---------------------------------------------------------------------------------


def _show(ax, pixels, title=None, fontsize=None):
    ax.imshow(_squeeze_grey(pixels), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def show_grid(ax, images, ncols: int, title: str | None = None):
    """Draw ``image_grid(images, ncols)`` on a matplotlib axis, without ticks."""
    _show(ax, image_grid(images, ncols), title)


def show_row(axes, images, labels, ylabel: str | None = None):
    """One image per axis, each titled by its label; ``ylabel`` names the row."""
    for ax, image, label in zip(axes, to_uint8(images), labels):
        _show(ax, image, label, fontsize=9)
    if ylabel:
        axes[0].set_ylabel(ylabel)


# --- Files written ---------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """A uint8 (H, W, C) picture as PNG file contents, each ``text`` item in a tEXt chunk (Latin-1 only)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    to_pil(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def gif_bytes(frames, comment: str, frame_ms: int = 100, last_ms: int = 1500) -> bytes:
    """An animated GIF of uint8 (H, W, C) ``frames``, holding the last one; ``comment`` goes into the file
    (GIF has no text chunks like PNG)."""
    pictures = [to_pil(frame) for frame in frames]
    buffer = io.BytesIO()
    pictures[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        loop=0,
        duration=[frame_ms] * (len(pictures) - 1) + [last_ms],
        comment=comment,
    )
    return buffer.getvalue()


def _tiles(frames: np.ndarray) -> np.ndarray:
    """(F, n, H, W, C) frames in the model's range -> uint8 (n, F, H, W, C)."""
    pixels = to_uint8(frames.reshape(-1, *frames.shape[2:])).reshape(frames.shape)
    return np.moveaxis(pixels, 0, 1)


def latent_tiles(latents: np.ndarray, size: int, spread: float = 3.0) -> np.ndarray:
    """Latents (N, h, w, c) as grey images (N, size, size, 1) in the model's range, for showing: the c channels
    side by side in a near-square grid (2 × 2 for four), each value v shown as v / ``spread`` (so ±3 standard
    deviations of unit-variance latents span black to white), enlarged by repeating pixels, and padded white
    to ``size``."""
    n, h, w, c = latents.shape
    k = math.ceil(math.sqrt(c))
    padded = np.concatenate([latents, np.full((n, h, w, k * k - c), np.nan)], axis=-1)
    grid = padded.reshape(n, h, w, k, k).transpose(0, 3, 1, 4, 2).reshape(n, k * h, k * w)
    grid = np.clip(np.nan_to_num(grid / spread, nan=1.0), -1.0, 1.0)
    scale = max(1, size // max(k * h, k * w))
    grid = np.repeat(np.repeat(grid, scale, axis=1), scale, axis=2)[:, :size, :size]
    out = np.ones((n, size, size), np.float32)
    out[:, : grid.shape[1], : grid.shape[2]] = grid
    return out[..., None]


def trajectory_strip(xs: np.ndarray, x0s: np.ndarray, latents: np.ndarray | None = None) -> np.ndarray:
    """Two rows per image: x_t at every frame (``xs``, (F, n, H, W, C)), from the noise to the sample, and under
    each x_t its prediction of x_0 (``x0s``, (F - 1, n, H, W, C)). For a latent model, ``xs`` and ``x0s`` are
    decoded and ``latents`` (F, n, h, w, c), the x_t themselves, make a third row in between (``latent_tiles``).

    The last frame has no prediction under it (it is the sample); that tile
    stays blank.
    """
    rows = [_tiles(xs)]
    if latents is not None:
        frames, n = latents.shape[:2]
        tiles = latent_tiles(latents.reshape(frames * n, *latents.shape[2:]), xs.shape[2])
        rows.append(_tiles(np.broadcast_to(tiles.reshape(frames, n, *tiles.shape[1:]), xs.shape)))
    blank = np.full_like(rows[0][:, :1], 255)
    rows.append(np.concatenate([_tiles(x0s), blank], axis=1))
    rows = np.stack(rows, axis=1)  # (n, rows, frames, H, W, C)
    return image_grid(rows.reshape(-1, *rows.shape[3:]), ncols=rows.shape[2])


# --- Files read ------------------------------------------------------------------------------


def open_image(path, what: str) -> Image.Image:
    """The image file ``path``, fully read; a GenerationError names ``what`` it is if it cannot be."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise GenerationError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise GenerationError(f"{what} {path} is not an image that can be read ({error})") from None


def png_text(path, key: str) -> str | None:
    """The tEXt chunk ``key`` of the image file ``path`` (None if it has none)."""
    return getattr(open_image(path, "image"), "text", {}).get(key)


def _fit(image: Image.Image, size: int, resize: bool, what: str, path, resample) -> Image.Image:
    if image.size == (size, size):
        return image
    if not resize:
        raise GenerationError(
            f"{what} {path} is {image.width}×{image.height} but the model makes {size}×{size} images: "
            f"give a {size}×{size} image, or allow resizing (--resize)"
        )
    return image.resize((size, size), resample)


def load_image(path, size: int, channels: int, resize: bool = False) -> np.ndarray:
    """An image file as a float32 (size, size, channels) array in the model's range [-1, 1].

    Its channels must be the model's (grayscale "L" for 1, "RGB" for 3); its
    size too, unless ``resize`` (Lanczos). Raises GenerationError otherwise.
    """
    image = open_image(path, "init image")
    found = CHANNELS.get(image.mode)
    if found != channels:
        raise GenerationError(
            f"init image {path} has "
            + (f"{found} channel(s) ({image.mode})" if found else f"mode {image.mode}")
            + f", but the model makes {channels}-channel images: convert it to "
            + {1: "grayscale (L)", 3: "RGB"}.get(channels, f"{channels} channels")
        )
    image = _fit(
        image.convert("L") if image.mode == "1" else image, size, resize, "init image", path, Image.Resampling.LANCZOS
    )
    pixels = np.asarray(image, np.uint8).reshape(size, size, channels)
    return data.scale_pixels(pixels)


def load_images(path, size: int, channels: int, count: int | None = None, pad: int = 2) -> np.ndarray:
    """The pictures in an image file, float32 (n, size, size, channels) in the model's range: the image itself if
    it is size × size, or the tiles of a grid that ``image_grid`` made (``pad`` pixels apart; the first ``count``
    of them, if given). Raises GenerationError if it is neither, or has other channels than the model's."""
    image = open_image(path, "image")
    found = CHANNELS.get(image.mode)
    if found != channels:
        raise GenerationError(
            f"image {path} has {found or image.mode} channel(s) but the model makes {channels}-channel images"
        )
    pixels = np.asarray(image, np.uint8).reshape(image.height, image.width, channels)
    tile = size + pad
    if (image.height + pad) % tile or (image.width + pad) % tile:
        raise GenerationError(
            f"image {path} is {image.width}×{image.height}: neither one {size}×{size} picture of this model nor a "
            f"grid of them {pad} pixels apart (as sample.py writes)"
        )
    rows, cols = (image.height + pad) // tile, (image.width + pad) // tile
    tiles = [pixels[r * tile : r * tile + size, c * tile : c * tile + size] for r in range(rows) for c in range(cols)]
    return data.scale_pixels(np.stack(tiles[:count]))


def load_mask(path, size: int, resize: bool = False) -> np.ndarray:
    """A mask image as float32 (size, size, 1): 1 where the init image is kept (black), 0 where generated (white).

    White marks what to generate anew, as in the common inpainting tools; any
    mode is read as brightness, thresholded at half. Resized (nearest
    neighbour) only if ``resize``.
    """
    image = _fit(open_image(path, "mask").convert("L"), size, resize, "mask", path, Image.Resampling.NEAREST)
    return (np.asarray(image)[..., None] < 128).astype(np.float32)
