"""What a watermark has to survive: the everyday changes an image meets after it is made.

Each attack takes images (n, H, W, C) in the model's range [-1, 1] and returns images of the same shape and
range; those that draw random numbers take a ``seed`` and give the same output for the same seed. They follow
the attacks of Wen et al. (2023, Sec. 4.1), scaled to 28 × 28 pictures: noise, blur, JPEG, crop-and-resize,
rotation, brightness and contrast. (Re-generation with img2img needs a model; benchmarks/watermarks.py runs it
with ``diffusion.editing.img2img``.)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from diffusion import data, pictures


def gaussian_noise(images, sigma: float, seed: int) -> np.ndarray:
    """Add N(0, sigma^2) noise, sigma in units of the [0, 1] pixel range (so 2 sigma in the model's), and clip."""
    images = np.asarray(images, np.float64)
    noise = np.random.default_rng(seed).standard_normal(images.shape)
    return np.clip(images + 2.0 * sigma * noise, -1.0, 1.0)


def gaussian_blur(images, sigma: float) -> np.ndarray:
    """Blur each image with a Gaussian kernel of ``sigma`` pixels (edges reflected)."""
    return ndimage.gaussian_filter(np.asarray(images, np.float64), sigma=(0, sigma, sigma, 0), mode="reflect")


def jpeg(images, quality: int) -> np.ndarray:
    """Save each image as a JPEG of ``quality`` (1-95, Pillow) and read it back."""
    out = []
    for pixels in pictures.to_uint8(images):
        buffer = io.BytesIO()
        pictures.to_pil(pixels).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer), np.uint8).reshape(pixels.shape))
    return data.scale_pixels(np.stack(out))


def crop_and_resize(images, keep: float, seed: int) -> np.ndarray:
    """Crop a square of ``keep`` times the side at a random place in each image and resize it back (bilinear)."""
    images = np.asarray(images, np.float64)
    rng = np.random.default_rng(seed)
    n, height, width, _ = images.shape
    side = max(1, round(keep * min(height, width)))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = image[top : top + side, left : left + side]
        out[i] = ndimage.zoom(crop, (height / side, width / side, 1), order=1, mode="nearest", grid_mode=True)
    return np.clip(out, -1.0, 1.0)


def rotate(images, degrees: float) -> np.ndarray:
    """Rotate each image about its centre by ``degrees`` (bilinear), the corners filled with the background."""
    images = np.asarray(images, np.float64)
    return np.clip(ndimage.rotate(images, degrees, axes=(2, 1), reshape=False, order=1, cval=-1.0), -1.0, 1.0)


def brightness_contrast(images, brightness: float, contrast: float) -> np.ndarray:
    """Scale the pixels about mid-grey by ``contrast`` and shift them by ``brightness`` ([0, 1] units), then clip."""
    images = np.asarray(images, np.float64)
    return np.clip(contrast * images + 2.0 * brightness, -1.0, 1.0)
