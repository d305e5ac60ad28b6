"""The autoencoder of latent diffusion: images to a small grid of latents and back (Rombach et al. 2022, Sec. 3.1).

    x (28×28×1) ─ encoder ─ mean, log variance (7×7×4 each) ─ z = mean + std · eps ─ decoder ─ x̂ (28×28×1)

- **Encoder.** A 3×3 convolution, then per level ``num_res_blocks`` residual
  blocks (``diffusion.unet.ResBlock``, without a conditioning vector) and a
  stride-2 convolution between levels, so that ``len(channel_mult)`` levels
  shrink the side by f = 2^(levels - 1); a middle block; GroupNorm, SiLU and a
  3×3 convolution to 2 · ``latent_channels`` channels: the mean and log variance
  of a diagonal Gaussian posterior q(z | x) (Kingma & Welling 2014).
- **Decoder.** The mirror image: from the latent up through the levels, each
  ending in a nearest-neighbour ×2 upsampling and a 3×3 convolution, to an image.
- **Loss** (``loss``): a reconstruction term (L1 or L2) plus a small multiple
  of KL(q(z | x) || N(0, I)), the "KL-reg" autoencoder of Rombach et al. 2022
  (Sec. 3.1; their KL-f4 model weighs the KL by 1e-6). At 28×28 no perceptual
  or adversarial term is needed.
- **Scale.** So small a KL weight leaves the latents far from unit variance;
  latent diffusion multiplies them by a factor (``latent_scale``: 1 / their
  standard deviation over training images, 0.18215 for Stable Diffusion's
  autoencoder) before diffusing, and divides by it before decoding, so the
  noise schedule meets data of the variance it was designed for.

With f = 4 a 28×28 digit becomes 7×7×4 = 196 numbers, a quarter of its 784
pixels: 28 is a multiple of 4, so no padding is needed (32×32 colour images
become 8×8×4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.errors import ConfigError
from diffusion.unet import COMPUTE_DTYPES, GroupNorm, ResBlock, check_sizes, upsample_nearest

RECONSTRUCTION_LOSSES = ("l1", "l2")
LOG_VARIANCE_RANGE = (-30.0, 20.0)  # the posterior's log variance is clipped to this (as LDM does), so exp() is finite


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Every setting of the autoencoder, checked on construction.

    Args:
        image_size: height = width of the images; a multiple of the factor f = 2^(len(channel_mult) - 1).
        in_channels: channels of the images.
        latent_channels: channels of the latent grid.
        channels: feature channels of the first level; level i has ``channels * channel_mult[i]``.
        channel_mult: one multiplier per level; each level after the first halves the side.
        num_res_blocks: residual blocks per level, in the encoder and in the decoder.
        norm_groups: GroupNorm groups; must divide every level's channels.
        compute_dtype: "float32", or "bfloat16" for convolutions on accelerators.
    """

    image_size: int = 28
    in_channels: int = 1
    latent_channels: int = 4
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    compute_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        check_sizes(self, ("image_size", "in_channels", "latent_channels", "channels", "num_res_blocks", "norm_groups"))
        if self.image_size % self.factor:
            raise ConfigError(
                f"{len(self.channel_mult)} levels shrink the side by {self.factor}, which does not divide "
                f"image_size={self.image_size}: use fewer channel_mult entries, or pad the images"
            )
        for width in self.widths:
            if width % self.norm_groups:
                raise ConfigError(f"norm_groups={self.norm_groups} does not divide the {width} channels of a level")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {self.compute_dtype!r})")

    @property
    def factor(self) -> int:
        """How many times smaller the latent's side is than the image's: f = 2^(levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def widths(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of one image's latent."""
        side = self.image_size // self.factor
        return side, side, self.latent_channels


def _conv(cin, cout, *, dtype, rngs, **kw):
    return nnx.Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs, **kw)


class Encoder(nnx.Module):
    """Image (B, H, W, C) -> the posterior's mean and log variance stacked on the channels (B, h, w, 2 c)."""

    def __init__(self, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        dtype, widths = COMPUTE_DTYPES[c.compute_dtype], c.widths
        block = dict(dropout=0.0, norm_groups=c.norm_groups, dtype=dtype, rngs=rngs)
        self.conv_in = _conv(c.in_channels, widths[0], dtype=dtype, rngs=rngs)
        self.levels, self.downsample = nnx.List(), nnx.List()
        previous = widths[0]
        for i, width in enumerate(widths):
            self.levels.append(nnx.List([ResBlock(previous if j == 0 else width, width, 0, **block)
                                         for j in range(c.num_res_blocks)]))
            if i < len(widths) - 1:
                self.downsample.append(_conv(width, width, strides=2, dtype=dtype, rngs=rngs))
            previous = width
        self.mid = ResBlock(widths[-1], widths[-1], 0, **block)
        self.norm_out = GroupNorm(widths[-1], c.norm_groups)
        self.conv_out = _conv(widths[-1], 2 * c.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        return self.conv_out(nnx.silu(self.norm_out(self.mid(h)))).astype(jnp.float32)


class Decoder(nnx.Module):
    """Latent (B, h, w, c) -> image (B, H, W, C)."""

    def __init__(self, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        dtype, widths = COMPUTE_DTYPES[c.compute_dtype], c.widths
        block = dict(dropout=0.0, norm_groups=c.norm_groups, dtype=dtype, rngs=rngs)
        self.conv_in = _conv(c.latent_channels, widths[-1], dtype=dtype, rngs=rngs)
        self.mid = ResBlock(widths[-1], widths[-1], 0, **block)
        self.levels, self.upsample = nnx.List(), nnx.List()
        previous = widths[-1]
        for i in reversed(range(len(widths))):
            self.levels.append(nnx.List([ResBlock(previous if j == 0 else widths[i], widths[i], 0, **block)
                                         for j in range(c.num_res_blocks)]))
            if i > 0:
                self.upsample.append(_conv(widths[i], widths[i], dtype=dtype, rngs=rngs))
            previous = widths[i]
        self.norm_out = GroupNorm(widths[0], c.norm_groups)
        self.conv_out = _conv(widths[0], c.in_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.upsample):
                h = self.upsample[i](upsample_nearest(h))
        return self.conv_out(nnx.silu(self.norm_out(h))).astype(jnp.float32)


class Autoencoder(nnx.Module):
    """The KL-regularised autoencoder of an ``AutoencoderConfig`` (see the module docstring)."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encode(self, x):
        """The posterior q(z | x) of images x (B, H, W, C): its mean and log variance, each (B, h, w, c)."""
        mean, log_variance = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, jnp.clip(log_variance, *LOG_VARIANCE_RANGE)

    def decode(self, z):
        """Images (B, H, W, C) from latents z (B, h, w, c), unscaled."""
        return self.decoder(z)

    def __call__(self, x, key):
        """(reconstruction, mean, log variance): x encoded, a latent drawn from q(z | x) with ``key``, decoded."""
        mean, log_variance = self.encode(x)
        return self.decode(sample_posterior(mean, log_variance, key)), mean, log_variance


def sample_posterior(mean, log_variance, key):
    """z = mean + exp(log_variance / 2) · eps, eps ~ N(0, I): a draw from the diagonal Gaussian q(z | x)
    (the reparameterisation of Kingma & Welling 2014, Sec. 2.4)."""
    return mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean, log_variance):
    """KL(N(mean, exp(log_variance)) || N(0, I)) of each example, summed over its latent:
    1/2 Σ (mean² + σ² − 1 − log σ²) (Kingma & Welling 2014, Appendix B)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_variance) - 1.0 - log_variance, axis=(1, 2, 3))


def loss(model, x, cond, key, *, kl_weight: float, reconstruction: str = "l2"):
    """The autoencoder's training loss: reconstruction error (L1 as LDM's, or squared) + kl_weight · KL (Rombach et
    al. 2022, Sec. 3.1).

    Both terms are sums over an image, as in LDM, so ``kl_weight`` has LDM's
    meaning (1e-6 in their KL-f4); the total is divided by the number of
    pixels, so the loss reads as a per-pixel error. ``cond`` is unused (the
    autoencoder is not conditioned); it is there so that every kind of model
    has the same loss signature ``(model, x, cond, key)``.
    """
    x_hat, mean, log_variance = model(x, key)
    error = jnp.abs(x_hat - x) if reconstruction == "l1" else jnp.square(x_hat - x)
    pixels = np.prod(x.shape[1:])
    return jnp.mean(jnp.sum(error, axis=(1, 2, 3)) + kl_weight * kl_divergence(mean, log_variance)) / pixels


def psnr(x, y) -> np.ndarray:
    """Peak signal-to-noise ratio of each image of y against x, in dB, both in the model's range [-1, 1]:
    10 log10(peak² / MSE) with the peak-to-peak range 2."""
    mse = np.mean(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)), axis=(1, 2, 3))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))
