"""Diffusion in an autoencoder's latent space: encode once, denoise latents, decode once (Rombach et al. 2022).

A latent run (``diffusion.configs.LatentConfig``) trains the same U-Net as a
pixel run, on the latents of a trained ``diffusion.autoencoder.Autoencoder``
instead of on pixels:

- **Training data.** Every training image is encoded once when a run starts
  (``posterior_moments``): the mean and log variance of q(z | x), kept in
  memory. Each step draws its latents from those posteriors afresh
  (``sample_latents``) and multiplies them by the scale factor, so the U-Net
  sees data of about unit variance.
- **Sampling** is unchanged: every sampler, guidance and seed works on the
  latent grid, and ``LatentSpace.decode`` turns the result into images once at
  the end. img2img encodes its starting image (``LatentSpace.encode``: the
  posterior mean, scaled); inpainting needs its mask on the latent grid
  (``latent_mask``), which moves its edges to those of whole latent cells.

A ``LatentSpace`` holds the autoencoder's weights as pytree leaves, like
``diffusion.unet.as_denoiser``, so its compiled encode and decode take them as
arguments.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import data
from diffusion.autoencoder import Autoencoder, sample_posterior

SCALE_IMAGES = 2048  # the training images whose latents decide the scale factor


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


class LatentSpace(NamedTuple):
    """An autoencoder (split into its graph and weights), the scale factor of its latents, and how many image
    pixels one latent cell covers along each side (f)."""

    graphdef: nnx.GraphDef
    weights: nnx.State
    scale: float
    factor: int

    def moments(self, x):
        """The posterior's (mean, log variance) of images x (B, H, W, C) in the model range, unscaled."""
        return _encode(self.graphdef, self.weights, jnp.asarray(x, jnp.float32))

    def encode(self, x):
        """The scaled latents of images x: the posterior mean times ``scale`` (what img2img starts from)."""
        return self.moments(x)[0] * self.scale

    def decode(self, z):
        """Images (in the model range, not clipped) from scaled latents z: decoder(z / scale)."""
        return _decode(self.graphdef, self.weights, jnp.asarray(z, jnp.float32) / self.scale)


def latent_space(autoencoder: Autoencoder, scale: float) -> LatentSpace:
    """The ``LatentSpace`` of a trained autoencoder and its scale factor."""
    graphdef, weights = nnx.split(autoencoder)
    return LatentSpace(graphdef, weights, float(scale), autoencoder.config.factor)


def posterior_moments(space: LatentSpace, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The mean and log variance of q(z | x) of every uint8 image, stacked on the channels: (N, h, w, 2 c) float32.

    Encoded in batches of ``batch_size`` (the last one padded, so one program
    is compiled), once per training run.
    """
    parts = []
    for start in range(0, len(images), batch_size):
        x = data.to_model_range(images[start : start + batch_size])
        keep = len(x)
        x = np.concatenate([x, np.zeros((batch_size - keep, *x.shape[1:]), x.dtype)])
        mean, log_variance = space.moments(x)
        parts.append(np.concatenate([np.asarray(mean), np.asarray(log_variance)], axis=-1)[:keep])
    return np.concatenate(parts)


def sample_latents(moments, key, scale: float):
    """Scaled latents drawn from posteriors given as stacked (mean, log variance) (B, h, w, 2 c):
    scale · (mean + std · eps), what a latent run's U-Net is trained on."""
    mean, log_variance = jnp.split(moments, 2, axis=-1)
    return scale * sample_posterior(mean, log_variance, key)


def latent_scale(moments: np.ndarray) -> float:
    """The scale factor that gives latents unit variance: 1 / std of the posterior means (Rombach et al. 2022,
    Sec. 4.3.2 and Appendix G, "rescale the latent space"; Stable Diffusion's is 0.18215).

    LDM takes the standard deviation of one batch of posterior samples; the
    mean's is used here, over ``moments`` of ``SCALE_IMAGES`` training images
    (with a small KL weight the posteriors are so narrow that the two agree).
    """
    mean = np.split(np.asarray(moments, np.float64), 2, axis=-1)[0]
    return float(1.0 / mean.std())


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """An inpainting mask (H, W, 1) (1 = keep, 0 = repaint; ``diffusion.pictures.load_mask``) on the latent grid
    (H / f, W / f, 1).

    A latent cell is kept only if all of its f × f pixels are (min pooling):
    a latent cell decodes to all of its pixels, so the region repainted grows
    to whole cells, and no pixel that was to be repainted is kept.
    """
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return np.asarray(mask, np.float32).reshape(h, factor, w, factor, 1).min(axis=(1, 3))
