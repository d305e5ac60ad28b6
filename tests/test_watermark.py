"""Tree-Ring watermarks: what marking changes, the calibration of the test, detection through DDIM inversion on
the exact denoiser of a Gaussian mixture, the pixel baseline, and the attacks."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from diffusion import attacks, editing, mixture, watermark
from diffusion.errors import GenerationError
from diffusion.samplers import sample
from diffusion.schedules import Schedule

SHAPE = (28, 28, 1)


def _spectrum(x):
    return np.fft.fft2(np.asarray(x, np.float64), axes=(-3, -2), norm="ortho")


@pytest.mark.parametrize("pattern", watermark.PATTERNS)
def test_marking_sets_the_masked_frequencies_to_the_key_and_leaves_every_other_one(pattern):
    key = watermark.Key(7, pattern)
    noise = jax.random.normal(jax.random.key(0), (8, *SHAPE))
    marked = watermark.mark(noise, key)
    mask, values = watermark.key_mask(key, SHAPE), watermark.key_values(key, SHAPE)
    assert mask.sum() == 248  # the default band: integer frequencies with 64 <= ky^2 + kx^2 <= 144
    assert watermark.key_mask(watermark.Key(7, radius=5, inner_radius=0), SHAPE).sum() == 81  # the paper's disc
    before, after = _spectrum(noise), _spectrum(marked)
    np.testing.assert_allclose(after[:, ~mask], before[:, ~mask], atol=2e-5)
    np.testing.assert_allclose(after[:, mask], np.broadcast_to(values[mask], after[:, mask].shape), atol=2e-5)
    # Hermitian: the value at -k is the conjugate of the value at k, so the marked noise is real
    flipped = np.roll(values[::-1, ::-1], 1, axis=(0, 1))
    np.testing.assert_allclose(flipped, np.conj(values), atol=1e-12)
    np.testing.assert_array_equal(np.roll(mask[::-1, ::-1], 1, axis=(0, 1)), mask)


def test_rings_are_constant_on_each_ring_and_the_key_lives_in_its_channel():
    key = watermark.Key(3, "rings", radius=4, inner_radius=0, channel=2)
    shape = (16, 16, 3)
    values, mask = watermark.key_values(key, shape), watermark.key_mask(key, shape)
    assert not mask[..., :2].any() and mask[..., 2].sum() == 49
    k = np.fft.fftfreq(16) * 16
    ring = np.rint(np.hypot(k[:, None], k[None, :]))
    for r in range(5):
        on_ring = values[..., 2][(ring == r) & mask[..., 2]]
        assert np.allclose(on_ring, on_ring[0]) and np.allclose(on_ring.imag, 0)
    assert len({round(float(values[..., 2][ring == r][0].real), 9) for r in range(5)}) == 5


def test_rings_and_random_keys_keep_the_noise_variance_and_zeros_removes_the_masked_share():
    noise = jax.random.normal(jax.random.key(1), (4000, *SHAPE))
    share = 248 / 784
    for seed in range(3):
        for pattern, expected in (("rings", None), ("random", None), ("zeros", 1 - share)):
            key = watermark.Key(seed, pattern)
            variance = float(np.var(watermark.mark(noise, key)))
            if expected is None:  # 1 - share + ||kappa||^2 / D, and ||kappa||^2 is about |M| on average
                expected = 1 - share + np.sum(np.abs(watermark.key_values(key, SHAPE)) ** 2) / 784
            assert abs(variance - expected) < 0.01


@pytest.mark.parametrize("pattern", watermark.PATTERNS)
def test_p_values_of_unmarked_noise_are_uniform_and_marked_noise_is_found(pattern):
    key = watermark.Key(11, pattern)
    noise = jax.random.normal(jax.random.key(2), (3000, *SHAPE))
    p = watermark.p_values(noise, key)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert abs(np.mean(p < 0.05) - 0.05) < 0.015
    assert np.all(watermark.p_values(watermark.mark(noise[:200], key), key) < 1e-12)
    # whatever the scale of the recovered noise: the test puts it back to unit variance first
    np.testing.assert_allclose(watermark.p_values(0.7 * noise[:50], key), p[:50], rtol=1e-6, atol=1e-12)


def test_the_p_value_of_the_zeros_key_is_the_f_law_of_its_distance():
    """For the zeros key eta / |M| is a ratio of two independent chi-squared variances: exactly F(|M|, D - |M|).
    The quadrature over the scale estimate in ``p_values`` must give that law."""
    key = watermark.Key(5, "zeros")
    noise = jax.random.normal(jax.random.key(6), (500, *SHAPE))
    eta, dof, noncentrality = watermark.statistic(noise, key)
    assert noncentrality == 0.0 and dof == 248
    np.testing.assert_allclose(watermark.p_values(noise, key), stats.f.cdf(eta / dof, dof, 784 - dof), atol=1e-3)


def test_a_marked_generation_is_found_by_ddim_inversion_and_an_unmarked_or_wrong_key_is_not():
    schedule = Schedule("linear", 1000)
    shape = (8, 8, 1)
    mix = mixture.random_mixture(0, 8, 64, std_range=(0.3, 0.6))
    eps = mixture.exact_denoiser(mix, schedule, "eps")

    def denoiser(x, t, cond=None):  # the mixture lives on flat vectors; the watermark on images
        return eps(x.reshape(len(x), -1), t, cond).reshape(x.shape)

    noise = jax.random.normal(jax.random.key(0), (400, *shape))
    settings = dict(schedule=schedule, steps=50, parameterization="eps")
    unmarked = editing.ddim_invert(denoiser, sample(denoiser, noise, sampler="ddim", **settings).x, **settings).x
    for key in (watermark.Key(3), watermark.Key(3, "rings", radius=2.5, inner_radius=0)):  # default band; disc
        wrong = dataclasses.replace(key, seed=4)
        images = sample(denoiser, watermark.mark(noise, key), sampler="ddim", **settings).x
        marked = editing.ddim_invert(denoiser, images, **settings).x
        assert np.all(watermark.p_values(marked, key) < 0.01)
        # inversion keeps the chi-squared null nearly exact on the exact denoiser
        assert stats.kstest(watermark.p_values(unmarked, key), "uniform").pvalue > 0.01
        for recovered in (marked, unmarked):
            assert np.mean(watermark.p_values(recovered, wrong) < 0.01) < 0.03


def test_the_spread_spectrum_baseline_is_calibrated_on_any_image_and_finds_its_pattern():
    noise = np.asarray(jax.random.normal(jax.random.key(3), (3000, *SHAPE)))
    images = np.tanh(noise - 1.0)  # not centred, not Gaussian
    p = watermark.spread_spectrum_p_values(images, seed=5)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    marked = watermark.spread_spectrum_mark(images[:200], seed=5, delta=0.2)
    assert np.all(watermark.spread_spectrum_p_values(marked, seed=5) < 1e-4)
    assert np.mean(watermark.spread_spectrum_p_values(marked, seed=6) < 0.01) < 0.05


def test_roc_counts_ranks_and_the_true_positives_above_the_unmarked_99th_percentile():
    unmarked = np.arange(100.0)  # 99 % of them at or below 98
    auc, tpr = watermark.roc(np.array([98.5, 99.5, 200.0, 50.0]), unmarked)
    assert tpr == 0.5  # 99.5 and 200 are above the threshold 99 (the higher 99th percentile)
    assert auc == pytest.approx((99 + 100 + 100 + 50.5) / 400)


@pytest.mark.parametrize(
    "attack",
    [
        lambda x, s: attacks.gaussian_noise(x, 0.1, s),
        lambda x, s: attacks.gaussian_blur(x, 1.0),
        lambda x, s: attacks.jpeg(x, 50),
        lambda x, s: attacks.crop_and_resize(x, 0.8, s),
        lambda x, s: attacks.rotate(x, 5.0),
        lambda x, s: attacks.brightness_contrast(x, 0.1, 0.8),
    ],
    ids=["noise", "blur", "jpeg", "crop", "rotate", "brightness"],
)
def test_every_attack_is_deterministic_keeps_the_shape_and_range_and_changes_the_image(attack):
    images = np.clip(np.asarray(jax.random.normal(jax.random.key(4), (3, *SHAPE))), -1, 1)
    out = attack(images, 0)
    assert out.shape == images.shape and out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, attack(images, 0))
    assert np.abs(out - images).mean() > 1e-3


def test_the_attacks_do_what_they_say():
    image = np.full((1, 28, 28, 1), -1.0)
    image[0, 10:18, 12:16] = 1.0
    assert attacks.gaussian_blur(image, 1.0).sum() == pytest.approx(image.sum())  # blur keeps the total
    rotated = attacks.rotate(image, 90.0)
    np.testing.assert_allclose(rotated[0, :, :, 0], np.rot90(image[0, :, :, 0], -1), atol=1e-9)
    np.testing.assert_allclose(attacks.brightness_contrast(image, 0.0, 1.0), image)
    noisy = attacks.gaussian_noise(np.zeros((1, 28, 28, 1)), 0.1, 0)
    assert np.std(noisy) == pytest.approx(0.2, rel=0.1)  # sigma 0.1 of the [0, 1] range is 0.2 of [-1, 1]
    np.testing.assert_allclose(attacks.crop_and_resize(image, 1.0, 0), image, atol=1e-9)


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1, pattern="stars"), "pattern"),
        (dict(seed=1, radius=0), "radius"),
        (dict(seed=1, inner_radius=-1), "inner radius"),
        (dict(seed=1, channel=-1), "channel"),
    ],
)
def test_a_bad_key_is_one_clear_error(arguments, match):
    with pytest.raises(GenerationError, match=match):
        watermark.Key(**arguments)


def test_a_key_that_does_not_fit_the_noise_says_what_does():
    with pytest.raises(GenerationError, match="below 3.5"):
        watermark.key_mask(watermark.Key(1, radius=5), (7, 7, 4))
    with pytest.raises(GenerationError, match="channel is 0 to 0"):
        watermark.key_mask(watermark.Key(1, channel=1), SHAPE)
    with pytest.raises(GenerationError, match="wider band"):
        watermark.key_mask(watermark.Key(1, radius=4.45, inner_radius=4.3), SHAPE)  # no |k| between them
    assert watermark.key_mask(watermark.Key(1), (7, 7, 4)).sum() == 20  # the default band: 2 <= |k| <= 3


def test_empirical_p_values_count_the_null_at_or_below_and_are_calibrated():
    null = np.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(watermark.empirical_p_values([0.5, 2.0, 9.0], null), [1 / 5, 4 / 5, 5 / 5])
    rng = np.random.default_rng(0)  # any law: the null and the tested statistic need only be drawn alike
    p = np.array([watermark.empirical_p_values(rng.chisquare(5), rng.chisquare(5, 19)) for _ in range(20000)])
    for alpha in (0.05, 0.25, 0.5):  # P(p <= alpha) = alpha exactly, for alpha a multiple of 1 / 20
        assert abs(np.mean(p <= alpha) - alpha) < 0.012
    assert p.min() == 1 / 20
