"""The autoencoder and the latent space: shapes, the KL and the loss against their formulas, the scale factor,
masks on the latent grid, pictures of latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomized
from diffusion import autoencoder, latent, pictures
from diffusion.autoencoder import Autoencoder, AutoencoderConfig
from diffusion.errors import ConfigError


@pytest.mark.parametrize(
    "size, channels, mult, latent_channels, expected",
    [
        (28, 1, (1, 2, 2), 4, (7, 7, 4)),  # digits, f = 4
        (32, 3, (1, 2, 2), 4, (8, 8, 4)),  # colour images, f = 4
        (28, 1, (1, 2), 3, (14, 14, 3)),  # f = 2
        (32, 3, (1, 2, 2, 2), 8, (4, 4, 8)),  # f = 8
    ],
)
def test_every_supported_size_encodes_to_its_latent_shape_and_decodes_back(size, channels, mult, latent_channels,
                                                                           expected):
    config = AutoencoderConfig(size, channels, latent_channels, channels=8, channel_mult=mult, norm_groups=4)
    assert config.latent_shape == expected and config.factor == size // expected[0]
    model = Autoencoder(config, rngs=nnx.Rngs(0))
    mean, log_variance = model.encode(jnp.zeros((2, size, size, channels)))
    assert mean.shape == log_variance.shape == (2, *expected)
    assert model.decode(mean).shape == (2, size, size, channels)


def test_a_size_the_levels_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match="shrink the side by 4, which does not divide image_size=30"):
        AutoencoderConfig(image_size=30)


def test_kl_divergence_is_the_closed_form_and_zero_for_the_prior():
    mean = jnp.full((1, 1, 1, 2), 0.5)
    log_variance = jnp.log(jnp.full((1, 1, 1, 2), 0.25))
    # Per dimension: 1/2 (mu^2 + s^2 - 1 - log s^2) = 1/2 (0.25 + 0.25 - 1 - log 0.25)
    expected = 2 * 0.5 * (0.25 + 0.25 - 1 - np.log(0.25))
    np.testing.assert_allclose(autoencoder.kl_divergence(mean, log_variance), [expected], rtol=1e-6)
    np.testing.assert_allclose(autoencoder.kl_divergence(jnp.zeros((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4))), 0.0)


def test_posterior_samples_have_the_posterior_mean_and_variance():
    mean, log_variance = jnp.full((20_000, 1, 1, 1), 1.5), jnp.full((20_000, 1, 1, 1), np.log(0.09))
    z = np.asarray(autoencoder.sample_posterior(mean, log_variance, jax.random.key(0)))
    assert abs(z.mean() - 1.5) < 0.01 and abs(z.std() - 0.3) < 0.01


def test_the_loss_is_the_per_pixel_error_plus_the_weighted_kl():
    model = randomized(Autoencoder(AutoencoderConfig(channels=8, norm_groups=4), rngs=nnx.Rngs(0)))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1), minval=-1, maxval=1)
    key = jax.random.key(2)
    x_hat, mean, log_variance = model(x, key)
    kl = autoencoder.kl_divergence(mean, log_variance)
    for reconstruction, error in (("l1", jnp.abs(x_hat - x)), ("l2", jnp.square(x_hat - x))):
        expected = jnp.mean(error) + 1e-3 * jnp.mean(kl) / 784
        got = autoencoder.loss(model, x, None, key, kl_weight=1e-3, reconstruction=reconstruction)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_psnr_is_ten_log10_of_peak_squared_over_mse():
    x = np.zeros((2, 4, 4, 1))
    y = x + np.array([0.1, 0.2])[:, None, None, None]
    np.testing.assert_allclose(autoencoder.psnr(x, y), 10 * np.log10(4 / np.array([0.01, 0.04])))


def test_the_scale_factor_makes_the_latents_unit_variance():
    rng = np.random.default_rng(0)
    mean = 0.2 + 5.0 * rng.standard_normal((500, 7, 7, 4))
    moments = np.concatenate([mean, np.full_like(mean, -20.0)], axis=-1).astype(np.float32)
    scale = latent.latent_scale(moments)
    assert abs(scale - 1 / 5.0) < 0.005
    z = np.asarray(latent.sample_latents(jnp.asarray(moments), jax.random.key(0), scale))
    assert abs(z.std() - 1.0) < 0.01


def test_a_mask_on_the_latent_grid_keeps_only_cells_whose_pixels_are_all_kept():
    keep = np.ones((28, 28, 1), np.float32)
    keep[5, 9] = 0.0  # one pixel to repaint: its whole 4x4 cell is repainted
    keep[16:, :] = 0.0  # the bottom rows 16..27, on cell edges
    cells = latent.latent_mask(keep, 4)
    expected = np.ones((7, 7, 1), np.float32)
    expected[1, 2] = 0.0
    expected[4:, :] = 0.0
    np.testing.assert_array_equal(cells, expected)


def test_latent_tiles_put_the_channels_side_by_side():
    z = np.zeros((1, 7, 7, 4), np.float32)
    z[0, :, :, 1] = 3.0  # white: +3 standard deviations
    z[0, :, :, 2] = -3.0  # black
    tiles = pictures.latent_tiles(z, 28)[0, ..., 0]
    assert tiles.shape == (28, 28)
    # Channels 0 1 / 2 3 in a 2 x 2 grid of 7 x 7, each pixel repeated 2 x 2.
    assert np.all(tiles[:14, :14] == 0) and np.all(tiles[:14, 14:] == 1) and np.all(tiles[14:, :14] == -1)
