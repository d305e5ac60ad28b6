"""Quality measures: Fréchet distance against closed forms, the committed classifier, precision / recall,
sliced Wasserstein against 1-D Wasserstein, mode weights of Gaussian mixtures."""

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from diffusion import classifier, data, metrics, mixture


@pytest.fixture(scope="module")
def held_out():
    return data.load_embedded_mnist("test")


@pytest.fixture(scope="module")
def floor_1000(held_out):
    return metrics.real_floor(1000, held_out[1])


def _with_moments(rng, n, mean, cov):
    """n points whose *sample* mean and covariance (ddof=1) are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)  # whiten: sample covariance I
    return z @ np.linalg.cholesky(cov).T + mean


# --- Fréchet distance ------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 16)) * np.arange(1, 17)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_between_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)  # variances
    a, b = _with_moments(rng, 300, mu1, np.diag(s1)), _with_moments(rng, 200, mu2, np.diag(s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_full_covariances_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(2)
    m1, m2 = rng.normal(size=(2, 5, 5))
    cov1, cov2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = _with_moments(rng, 400, mu1, cov1), _with_moments(rng, 300, mu2, cov2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_singular_covariances_is_exact():
    # 6 points in 20 dimensions: covariances of rank 5. A shift of the same points changes only the mean.
    x = np.random.default_rng(3).standard_normal((6, 20))
    shift = np.linspace(-1.0, 1.0, 20)
    assert metrics.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_frechet_distance_grows_with_the_mean_shift_and_the_scale():
    x = np.random.default_rng(4).standard_normal((2000, 3))
    assert metrics.frechet_distance(x, x + [1.0, 0.0, 0.0]) == pytest.approx(1.0, rel=1e-9)
    # N(0, I) vs N(0, 4 I) in 3-D: 3 (1 + 4 - 2 * 2) = 3.
    assert metrics.frechet_distance(x, 2.0 * x) == pytest.approx(3.0 * np.var(x, ddof=1, axis=0).mean(), rel=1e-2)


# --- The classifier and the digit metrics ----------------------------------------


def test_committed_classifier_reads_at_least_98_percent_of_held_out_digits(held_out):
    images, labels = held_out
    assert metrics.classifier_accuracy(images, labels) >= 0.98
    # Floats in the model range give the same answer as uint8 pixels.
    assert metrics.classifier_accuracy(data.to_model_range(images), labels) == metrics.classifier_accuracy(images, labels)


def test_corrupted_digits_and_wrong_labels_lower_the_conditional_accuracy(held_out):
    images, labels = held_out
    clean = metrics.classifier_accuracy(images, labels)
    noisy = data.to_model_range(images) + 1.5 * np.random.default_rng(0).standard_normal((1000, 28, 28, 1))
    assert metrics.classifier_accuracy(noisy.astype(np.float32), labels) < clean - 0.2
    shuffled = np.random.default_rng(1).permutation(labels)
    assert metrics.classifier_accuracy(images, shuffled) < 0.2  # chance is 0.1


def test_classifier_fid_of_real_digits_is_at_the_floor_and_of_noise_or_blanks_far_above(held_out, floor_1000):
    images, labels = held_out
    train_images, _ = data.load_embedded_mnist("train")
    assert 0.0 < floor_1000["fid_std"] < floor_1000["fid"] < 20.0
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, (1000, 28, 28, 1)).astype(np.float32)
    blank = np.zeros((1000, 28, 28), np.uint8)
    for fake in (noise, blank):
        assert metrics.classifier_fid(fake, images) > 50 * floor_1000["fid"]
    # Mode collapse: perfectly real digits, but only 0s and 1s, fool the accuracy and not the FID or recall.
    zeros_ones = np.concatenate([train_images[:500], train_images[-(labels.size - 500) :]])  # grouped by class
    report = metrics.evaluate_digits(zeros_ones[: len(labels)])
    assert report["fid"] > 50 * report["floor"]
    assert report["recall"] < 0.5 * report["floor_recall"]


def test_evaluate_digits_of_real_digits_matches_the_floor(held_out):
    _, labels = held_out
    train_images, train_labels = data.load_embedded_mnist("train")
    rng = np.random.default_rng(123)
    picks = np.concatenate([rng.choice(np.flatnonzero(train_labels == d), 100, replace=False) for d in range(10)])
    report = metrics.evaluate_digits(train_images[picks], train_labels[picks])
    assert report["n"] == 1000 and report["accuracy"] > 0.98
    assert abs(report["fid"] - report["floor"]) < 4 * report["floor_std"]
    assert report["precision"] == pytest.approx(report["floor_precision"], abs=0.05)
    assert report["recall"] == pytest.approx(report["floor_recall"], abs=0.05)


def test_missing_or_corrupt_weights_say_how_to_regenerate(tmp_path):
    with pytest.raises(classifier.ClassifierError, match="train_classifier.py"):
        classifier.load_classifier(tmp_path / "absent.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(classifier.ClassifierError, match="train_classifier.py"):
        classifier.load_classifier(tmp_path / "garbage.npz")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(classifier.ClassifierError, match="train_classifier.py"):
        classifier.load_classifier(tmp_path / "other.npz")


def test_saved_weights_load_back_identically(tmp_path):
    model = classifier.load_classifier()
    loaded = classifier.load_classifier(classifier.save_classifier(model, tmp_path / "w.npz"))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(classifier.logits_and_features(model, x)[0], classifier.logits_and_features(loaded, x)[0])
    with np.load(tmp_path / "w.npz", allow_pickle=False) as saved:
        assert "hidden/kernel" in saved.files and saved["hidden/kernel"].shape == (288, 128)


def test_random_shift_moves_whole_images_and_fills_with_background():
    x = np.full((64, 28, 28, 1), -1.0, np.float32)
    x[:, 13, 13] = 1.0
    shifted = np.asarray(classifier.random_shift(jax.random.key(0), x, 2))
    rows, cols = np.nonzero(shifted[..., 0] == 1.0)[1:]
    assert np.all(np.abs(rows - 13) <= 2) and np.all(np.abs(cols - 13) <= 2)
    assert len(set(zip(rows, cols))) > 15  # most of the 25 offsets occur
    assert np.sum(shifted == 1.0) == 64 and np.all((shifted == 1.0) | (shifted == -1.0))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 32, 32), np.uint8), "28 x 28"),
        (np.full((4, 28, 28, 1), np.nan, np.float32), "NaN"),
        (np.zeros((4, 28, 28), np.int64), "uint8"),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_digits(bad)


def test_bad_labels_are_refused_with_a_clear_message(held_out):
    images, labels = held_out
    with pytest.raises(ValueError, match="0..9"):
        metrics.classifier_accuracy(images, labels.astype(int) + 1)
    with pytest.raises(ValueError, match="one per image"):
        metrics.classifier_accuracy(images, labels[:10])


# --- Precision and recall ----------------------------------------------------------


def test_precision_and_recall_are_one_for_identical_sets_and_zero_for_disjoint_ones():
    real = np.random.default_rng(0).standard_normal((300, 8))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_counts_the_fake_points_on_the_real_manifold(monkeypatch):
    rng = np.random.default_rng(1)
    real = rng.standard_normal((400, 4))
    fake = np.concatenate([real[:150], rng.standard_normal((150, 4)) + 100.0])  # half real, half far away
    precision, recall = metrics.precision_recall(real, fake)
    assert precision == 0.5
    monkeypatch.setattr(metrics, "_ROWS_PER_CHUNK", 7)  # the chunked distance blocks give the same answer
    assert metrics.precision_recall(real, fake) == (precision, recall)


def test_precision_recall_on_the_k_nearest_neighbour_radius_by_hand():
    # 1-D real points 0, 1, 3: with k = 1 the radii are 1, 1, 2, so the real manifold is [-1, 5].
    # Fake points 0.5 and 5.0 (on the boundary) are on it, 5.5 is not.
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[0.5], [5.0], [5.5]])
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)
    # Fake radii are 4.5, 0.5, 0.5: the fake manifold [-4, 6] holds all three real points.
    assert recall == 1.0


def test_counts_take_numpy_integers_and_refuse_bools():
    real, fake = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [5.0], [5.5]])
    assert metrics.precision_recall(real, fake, k=np.int64(1)) == metrics.precision_recall(real, fake, k=1)
    with pytest.raises(ValueError, match="k must be a whole number"):
        metrics.precision_recall(real, fake, k=True)
    assert metrics.sliced_wasserstein(real, fake, num_projections=np.int64(8)) == metrics.sliced_wasserstein(
        real, fake, num_projections=8
    )
    with pytest.raises(ValueError, match="num_projections must be a whole number"):
        metrics.sliced_wasserstein(real, fake, num_projections=True)


# --- Sliced Wasserstein ------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_in_1d_is_the_wasserstein_distance(p):
    rng = np.random.default_rng(0)
    x, shift = rng.standard_normal((500, 1)), 0.7
    assert metrics.sliced_wasserstein(x, x + shift, p=p) == pytest.approx(shift, rel=1e-12)
    # Unequal sizes, by hand: quantile functions of {0, 1, 2} and {0, 3} differ by 0, 1, 2, 1 over
    # intervals of length 1/3, 1/6, 1/6, 1/3, so W1 = 5/6 and W2^2 = 7/6.
    expected = {1: 5 / 6, 2: np.sqrt(7 / 6)}[p]
    assert metrics.sliced_wasserstein([[0.0], [1.0], [2.0]], [[0.0], [3.0]], p=p) == pytest.approx(expected, rel=1e-12)


def test_sliced_wasserstein_in_1d_matches_scipy_for_unequal_sizes():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((37, 1)), 2.0 * rng.standard_normal((23, 1)) + 1.0
    expected = scipy.stats.wasserstein_distance(x[:, 0], y[:, 0])
    assert metrics.sliced_wasserstein(x, y, p=1) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_between_gaussians_matches_the_closed_form():
    # W2(N(0, 1), N(m, s^2)) = sqrt(m^2 + (1 - s)^2), with samples at exact quantiles.
    z = scipy.stats.norm.ppf((np.arange(20_000) + 0.5) / 20_000)[:, None]
    assert metrics.sliced_wasserstein(z, 0.5 + 2.0 * z, p=2) == pytest.approx(np.sqrt(0.25 + 1.0), rel=1e-3)


def test_sliced_wasserstein_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3))
    same = metrics.sliced_wasserstein(x, y, num_projections=500)
    assert same < 0.05
    shifted = [metrics.sliced_wasserstein(x, y + [d, 0.0, 0.0], num_projections=500) for d in (0.5, 1.0, 2.0)]
    assert same < shifted[0] < shifted[1] < shifted[2]
    # A pure shift delta: every projection moves by theta . delta. In 3-D, theta_1 is uniform on [-1, 1]
    # (Archimedes), so SW1 -> |delta| E|theta_1| = |delta| / 2 and SW2 -> |delta| sqrt(E theta_1^2) = |delta| / sqrt(3).
    x, shift = x[:50], [2.0, 0.0, 0.0]
    sw1 = metrics.sliced_wasserstein(x, x + shift, num_projections=20_000)
    sw2 = metrics.sliced_wasserstein(x, x + shift, num_projections=20_000, p=2)
    assert sw1 == pytest.approx(1.0, rel=0.015) and sw2 == pytest.approx(2.0 / np.sqrt(3), rel=0.015)


# --- Mode weights ----------------------------------------------------------------


def test_mode_weights_of_mixture_samples_match_the_mixture_weights():
    means = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]
    mix = mixture.make_mixture([1.0, 2.0, 3.0, 4.0], means, [0.3, 0.5, 0.4, 0.3])
    x, _ = mixture.sample(mix, jax.random.key(0), 20_000)
    weights = np.asarray(mix.weights)
    np.testing.assert_allclose(metrics.mode_weights(x, mix), weights, atol=4 * np.sqrt(0.25 / 20_000))
    assert metrics.missing_modes(x, mix).size == 0


def test_a_dropped_mode_is_reported_missing():
    ring = mixture.ring_mixture()
    x, component = mixture.sample(ring, jax.random.key(1), 4000)
    x = np.asarray(x)[np.asarray(component) != 3]
    weights = metrics.mode_weights(x, ring)
    assert weights[3] == 0.0 and weights.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.missing_modes(x, ring), [3])


def test_mode_weights_follow_the_most_probable_component_not_the_nearest_mean():
    # At x = 1 the narrow component at 0 is nearer, but the broad one at 3 is more probable.
    mix = mixture.make_mixture([1.0, 1.0], [[0.0], [3.0]], [0.1, 2.0])
    np.testing.assert_array_equal(metrics.mode_weights([[0.05], [1.0]], mix), [0.5, 0.5])


def test_classifier_training_learns(held_out):
    # A smoke test of train_classifier (the full run is scripts/train_classifier.py, 3 minutes).
    images, labels = data.load_embedded_mnist("train")
    picks = np.random.default_rng(0).choice(len(images), 512, replace=False)
    model = classifier.train_classifier(images[picks], labels[picks], steps=30, batch_size=64)
    test_images, test_labels = held_out
    logits, _ = classifier.logits_and_features(model, data.to_model_range(test_images))
    assert np.mean(logits.argmax(axis=1) == test_labels) > 0.5  # 30 steps on 512 digits: far above chance (0.1)


def test_evaluate_pixels_sees_a_shift_that_real_images_do_not_have():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 200, (800, 6, 6, 3), dtype=np.uint8)  # one distribution: a reference, a pool, draws
    reference, pool, same = real[:200], real[200:600], real[600:]
    fair = metrics.evaluate_pixels(same, reference, pool)
    assert fair["n"] == 200 and fair["floor_std"] > 0
    assert abs(fair["swd"] - fair["floor"]) < 0.15 * fair["floor"]  # a perfect generator scores near its floor
    brighter = metrics.evaluate_pixels(same + 50, reference, pool)  # +50 of 255: +0.39 in the model's range
    # A shift of every pixel by delta moves each projection theta . x by delta * sum(theta); SW_1 is the mean of
    # |delta sum(theta)| over directions, about delta * sqrt(2 D / pi) / sqrt(D) = delta * sqrt(2 / pi).
    assert brighter["swd"] > 4 * brighter["floor"]
    np.testing.assert_allclose(brighter["swd"], 50 / 127.5 * np.sqrt(2 / np.pi), rtol=0.15)
    floats = metrics.evaluate_pixels(data.to_model_range(same), reference, pool)
    assert floats["swd"] == pytest.approx(fair["swd"], rel=1e-5)  # pixels or model-range floats alike
    with pytest.raises(ValueError, match="generate fewer"):
        metrics.evaluate_pixels(real[:500], reference, pool)
    with pytest.raises(ValueError, match="one shape"):
        metrics.evaluate_pixels(same[:, :5], reference, pool)
