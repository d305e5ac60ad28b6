"""Quality measures for generated samples, each with a reference point that says what "perfect" is.

Digits, judged by the small classifier of ``diffusion.classifier`` (trained on
the embedded training split, 99 % accurate on the 1,000 held-out digits):

- ``classifier_accuracy``  the fraction of generated digits that the classifier
  reads as the class they were asked to be (conditional accuracy).
- ``classifier_fid``  the Fréchet distance (Heusel et al. 2017) between the
  classifier's penultimate features of two sets of digits. This is an
  *MNIST-classifier FID*: its numbers are not comparable with the Inception
  FID of papers, only with each other at the same sample size.
- ``real_floor``  the same distance for real digits that are not the
  reference: the score of a perfect generator at this sample size, which
  is never 0 (finite samples). Report it beside every FID.
- ``precision_recall``  improved precision and recall (Kynkäänniemi et al.
  2019): how much of the generated set lies on the real digits' manifold
  (quality), and how much of the real manifold the generated set covers
  (diversity).
- ``evaluate_digits``  all of the above against the held-out digits, in one dict.

Low-dimensional data (2-D toys, Gaussian mixtures), where the true
distribution is known:

- ``sliced_wasserstein``  the sliced Wasserstein distance between two samples.
- ``mode_weights`` / ``missing_modes``  the share of samples in each
  component of a ``diffusion.mixture.GaussianMixture``, to compare with its
  weights, and the components a sampler has (nearly) lost.

Everything returns plain Python floats or NumPy arrays; the statistics are
computed in float64 (the classifier itself runs in float32).
See ``docs/metrics.md`` for the measured floors and their spread.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from diffusion import classifier, data
from diffusion import mixture as mixture_lib
from diffusion.errors import InputError, check_whole, is_whole
from diffusion.mixture import GaussianMixture

REFERENCES = ("test", "train")
IMAGE_SHAPE = (28, 28)

# ---------------------------------------------------------------------------
# Digits through the classifier
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _classifier():
    return classifier.load_classifier()


def _as_digits(images, name: str = "images") -> np.ndarray:
    """Digits as float32 (N, 28, 28, 1) in [-1, 1], from uint8 pixels or floats in the model range.

    uint8 (N, 28, 28[, 1]) is taken as pixels 0..255; floats as the model range
    [-1, 1] of ``diffusion.data.to_model_range``, clipped to it the way saving
    an image would (samplers overshoot a little).
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or len(images) == 0:
        raise InputError(
            f"{name} must be a batch of 28 x 28 digits, (N, 28, 28) or (N, 28, 28, 1); got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return data.to_model_range(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"{name} must be uint8 pixels 0..255 or floats in [-1, 1]; got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise InputError(f"{name} contain NaN or infinite values: the sampler that made them diverged")
    return np.clip(images, -1.0, 1.0).astype(np.float32)[..., np.newaxis]


def _as_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"labels must be whole numbers, one per image: shape ({n},); got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= data.NUM_CLASSES:
        raise InputError(
            f"labels must be digit classes 0..{data.NUM_CLASSES - 1}; got {labels.min()} to {labels.max()}"
        )
    return labels


def _embed(images):
    """(logits, features) of the committed classifier, float64, for digits as ``_as_digits`` takes them."""
    return classifier.logits_and_features(_classifier(), _as_digits(images))


@functools.lru_cache(maxsize=len(REFERENCES))
def _reference(split: str):
    """(features, labels) of an embedded MNIST split, computed once."""
    images, labels = data.load_embedded_mnist(split)
    return _embed(images)[1], labels


def _check_reference(reference: str) -> str:
    if reference not in REFERENCES:
        raise InputError(
            f"unknown reference {reference!r}; choose 'test' (the 1,000 held-out digits, usual) or 'train'"
        )
    return reference


def classifier_predictions(images) -> np.ndarray:
    """The class (0..9) the classifier reads in each digit; images as uint8 pixels or floats in [-1, 1]."""
    return _embed(images)[0].argmax(axis=1)


def classifier_features(images) -> np.ndarray:
    """The classifier's penultimate features of each digit, (N, 128) float64: the space FID is measured in."""
    return _embed(images)[1]


def classifier_accuracy(images, labels) -> float:
    """The fraction of ``images`` that the classifier reads as their ``labels``.

    For generated digits with the labels they were conditioned on, this is
    the conditional accuracy: does a "7" come out as a 7? For real held-out
    digits it is the classifier's own accuracy (99.0 %), the ceiling. Its
    sampling spread is the binomial sqrt(acc (1 - acc) / N).
    """
    images = _as_digits(images)
    labels = _as_labels(labels, len(images))
    return float(np.mean(classifier_predictions(images) == labels))


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------


def _as_points(x, name: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise InputError(f"{name} must be a 2-D array (N, D) with N >= {min_rows}; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigen-decomposition.

    Eigenvalues that rounding made slightly negative are set to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(feats_a, feats_b) -> float:
    """The squared Fréchet (2-Wasserstein) distance between Gaussians fitted to two sets of features.

    The distance of the FID (Heusel et al. 2017), in the closed form for two
    Gaussians of Dowson & Landau 1982: with means mu and covariances C of
    feats_a (N, D) and feats_b (M, D),

        d^2 = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)).

    This is the number papers call FID (the square is not taken back).
    Numerics: C_a C_b is not symmetric, and a general matrix square root of
    it (``scipy.linalg.sqrtm``) can return complex values or lose accuracy
    when a covariance is singular (fewer samples than dimensions, or a
    feature that is always 0). Instead, C_a C_b is similar to the symmetric
    positive semi-definite M = C_a^(1/2) C_b C_a^(1/2), so tr((C_a C_b)^(1/2))
    is the sum of the square roots of M's eigenvalues, found with a symmetric
    eigen-solver; eigenvalues that rounding made slightly negative count as
    0. Everything is float64. Symmetric in its arguments up to rounding.
    """
    a = _as_points(feats_a, "feats_a", min_rows=2)
    b = _as_points(feats_b, "feats_b", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise InputError(f"the two feature sets have different dimensions: {a.shape[1]} and {b.shape[1]}")
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return max(float(distance), 0.0)  # d^2 >= 0; only rounding can push it below


def classifier_fid(images_a, images_b) -> float:
    """MNIST-classifier FID: ``frechet_distance`` of the classifier features of two sets of digits.

    Not Inception FID: comparable only with other MNIST-classifier FIDs at
    the same sample sizes, and always to be read beside ``real_floor``.
    Images are uint8 pixels or floats in [-1, 1], at least 2 per set.
    """
    return frechet_distance(classifier_features(images_a), classifier_features(images_b))


# ---------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------

_ROWS_PER_CHUNK = 1024  # bounds the pairwise-distance block in memory to 1024 x M float64s


def _sq_distances(a: np.ndarray, b: np.ndarray):
    """Blocks of squared Euclidean distances from rows of a to all rows of b: yields (start, block)."""
    b_sq = np.sum(b**2, axis=1)
    for start in range(0, len(a), _ROWS_PER_CHUNK):
        rows = a[start : start + _ROWS_PER_CHUNK]
        yield start, np.maximum(np.sum(rows**2, axis=1)[:, None] + b_sq - 2.0 * rows @ b.T, 0.0)


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = np.empty(len(points))
    for start, block in _sq_distances(points, points):
        radii[start : start + len(block)] = np.partition(block, k, axis=1)[:, k]  # column 0 is the point itself
    return radii


def _fraction_covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """The fraction of points inside at least one ball (centre, radius) -- the manifold estimate."""
    covered = np.zeros(len(points), dtype=bool)
    for start, block in _sq_distances(points, centres):
        covered[start : start + len(block)] = np.any(block <= radii, axis=1)
    return float(np.mean(covered))


def precision_recall(feats_real, feats_fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 (their Sec. 2), with their k = 3.

    Each set's manifold is estimated as the union of balls around its points,
    each ball reaching that point's k-th nearest neighbour in the same set.

    - precision: the fraction of fake points inside the real manifold (are
      the samples realistic?);
    - recall: the fraction of real points inside the fake manifold (does the
      generator cover all the variety of the data?).

    Both are 1 for identical sets. Real-vs-real values at the same sizes are
    below 1 (see ``real_floor``); compare with those, not with 1.
    """
    real = _as_points(feats_real, "feats_real")
    fake = _as_points(feats_fake, "feats_fake")
    if real.shape[1] != fake.shape[1]:
        raise InputError(f"the two feature sets have different dimensions: {real.shape[1]} and {fake.shape[1]}")
    if not is_whole(k, 1) or k >= min(len(real), len(fake)):
        smaller = min(len(real), len(fake))
        raise InputError(f"k must be a whole number from 1 to one less than the smaller set ({smaller}); got {k!r}")
    precision = _fraction_covered(fake, real, _knn_radii(real, k))
    recall = _fraction_covered(real, fake, _knn_radii(fake, k))
    return precision, recall


# ---------------------------------------------------------------------------
# The real-vs-real floor and the one-call evaluation
# ---------------------------------------------------------------------------


def _draw_real(pool_labels: np.ndarray, n: int, labels, rng) -> np.ndarray:
    """Indices of n distinct pool digits; with ``labels``, exactly as many of each class as there."""
    if labels is None:
        if n > len(pool_labels):
            raise InputError(f"cannot draw {n} real digits from a pool of {len(pool_labels)}; evaluate fewer samples")
        return rng.choice(len(pool_labels), n, replace=False)
    picks = []
    for digit, count in zip(*np.unique(labels, return_counts=True)):
        members = np.flatnonzero(pool_labels == digit)
        if count > len(members):
            raise InputError(
                f"the real-digit pool has only {len(members)} digits of class {digit}, but {count} are needed; "
                f"evaluate fewer samples of that class"
            )
        picks.append(rng.choice(members, count, replace=False))
    return np.concatenate(picks)


def real_floor(n: int, labels=None, reference: str = "test", num_draws: int = 5, seed: int = 0) -> dict:
    """What a perfect generator scores: the metrics of ``n`` *real* digits against the reference.

    The ``n`` digits are drawn (without replacement) from the embedded split
    that is not the reference, so they never overlap it: from the 9,000
    training digits when ``reference="test"``. With ``labels`` (one per
    generated digit) each draw has exactly their class counts, as the
    generated set does. Over ``num_draws`` draws, returns the mean and
    standard deviation of the classifier FID, and the mean precision and
    recall: {"fid", "fid_std", "precision", "recall"}.

    The floor is above 0 because finite samples never match exactly, and it
    falls as n grows (measured in docs/metrics.md: 6.0 at n = 500, 4.0 at
    1,000, for n/10 digits per class). For ``reference="test"`` the draws are
    training digits, which the classifier has seen; measured against unseen
    digits of the same size, this makes no difference within the spread.
    """
    reference = _check_reference(reference)
    check_whole("n", n, 2)
    if labels is not None:
        labels = _as_labels(labels, n)
    if not is_whole(num_draws, 2):
        raise InputError(f"num_draws must be a whole number >= 2, to give a spread (got {num_draws!r})")
    ref_features, _ = _reference(reference)
    pool_features, pool_labels = _reference("train" if reference == "test" else "test")
    rng = np.random.default_rng(seed)
    fids, precisions, recalls = [], [], []
    for _ in range(num_draws):
        drawn = pool_features[_draw_real(pool_labels, n, labels, rng)]
        fids.append(frechet_distance(drawn, ref_features))
        precision, recall = precision_recall(ref_features, drawn)
        precisions.append(precision)
        recalls.append(recall)
    return {
        "fid": float(np.mean(fids)),
        "fid_std": float(np.std(fids, ddof=1)),
        "precision": float(np.mean(precisions)),
        "recall": float(np.mean(recalls)),
    }


def evaluate_digits(images, labels=None, reference: str = "test", num_floor_draws: int = 5, seed: int = 0) -> dict:
    """Every digit metric of generated ``images`` against the real ``reference`` digits, in one dict.

    ``images``: uint8 pixels (N, 28, 28) or floats in [-1, 1] (N, 28, 28, 1),
    N >= 4; ``labels``: the class each was conditioned on, or None for an
    unconditional model. ``reference="test"`` compares with the 1,000
    held-out digits (100 per class). Returns

    - ``n``: the number of generated digits;
    - ``accuracy``: ``classifier_accuracy`` (None without labels);
    - ``fid``: ``classifier_fid`` against the reference;
    - ``floor``, ``floor_std``: ``real_floor``'s FID of n real digits with the
      same class counts, mean and spread over ``num_floor_draws`` draws; the
      spread is also about how much ``fid`` itself would move between seeds;
    - ``precision``, ``recall``: ``precision_recall`` (reference = real);
    - ``floor_precision``, ``floor_recall``: the same for the real draws.
    """
    images = _as_digits(images)
    n = len(images)
    labels = None if labels is None else _as_labels(labels, n)
    if n < 4:
        raise InputError(f"need at least 4 images to estimate a covariance and 3 nearest neighbours; got {n}")
    floor = real_floor(n, labels, reference, num_floor_draws, seed)  # checks the remaining arguments first
    ref_features, _ = _reference(reference)
    logits, features = _embed(images)
    precision, recall = precision_recall(ref_features, features)
    return {
        "n": n,
        "accuracy": None if labels is None else float(np.mean(logits.argmax(axis=1) == labels)),
        "fid": frechet_distance(features, ref_features),
        "floor": floor["fid"],
        "floor_std": floor["fid_std"],
        "precision": precision,
        "recall": recall,
        "floor_precision": floor["precision"],
        "floor_recall": floor["recall"],
    }


# ---------------------------------------------------------------------------
# Low-dimensional data: toys and Gaussian mixtures
# ---------------------------------------------------------------------------


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0, p: int = 1) -> float:
    """The sliced p-Wasserstein distance between the samples x (N, D) and y (M, D); p = 1 unless asked.

    SW_p(x, y)^p = E_theta[ W_p(theta . x, theta . y)^p ], theta uniform on the
    unit sphere (Rabin et al. 2011; Bonneel et al. 2015), estimated with
    ``num_projections`` random directions drawn from ``seed``. Each 1-D
    W_p is exact for the two empirical distributions: the integral over
    u in (0, 1) of |F_x^-1(u) - F_y^-1(u)|^p, both quantile functions being
    step functions (sorted samples), so N and M may differ.

    For a shift, y = x + delta, every projection moves by theta . delta, and
    SW_2 = |delta| / sqrt(D) as num_projections grows; in 1-D, SW_p = W_p exactly.
    The default p = 1 is less swayed by a few far-out samples than p = 2: on
    the 8-mode ring, a 10 % shrink towards the centre stands 4.9 times above
    the sampling floor with p = 1 and 2.2 times with p = 2 (5,000 samples).
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise InputError(f"x and y have different dimensions: {x.shape[1]} and {y.shape[1]}")
    if not is_whole(num_projections, 1):
        raise InputError(
            f"num_projections must be a whole number >= 1 (got {num_projections!r}); a few hundred is usual"
        )
    if p < 1:
        raise InputError(f"p must be >= 1 (got {p})")
    theta = np.random.default_rng(seed).standard_normal((x.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0)
    x_sorted, y_sorted = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    # The quantile levels where either step function jumps, and the interval each one ends.
    n, m = len(x), len(y)
    levels = np.unique(np.concatenate([np.arange(1, n + 1) / n, np.arange(1, m + 1) / m]))
    widths = np.diff(levels, prepend=0.0)
    middles = levels - widths / 2  # well inside each interval, safe from rounding at the jumps
    gaps = np.abs(x_sorted[np.floor(middles * n).astype(int)] - y_sorted[np.floor(middles * m).astype(int)])
    return float(np.mean(widths @ gaps**p) ** (1.0 / p))


def evaluate_pixels(images, reference, pool, num_projections: int = 256, num_floor_draws: int = 5,
                    seed: int = 0) -> dict:
    """Generated ``images`` of any dataset against real ones, where the digit classifier has nothing to say:
    the sliced Wasserstein distance (``sliced_wasserstein``, p = 1) between their pixel vectors and those of
    the real ``reference`` images, beside its floor, the distance of n real images drawn from ``pool``
    (disjoint from the reference) over ``num_floor_draws`` draws. It is not Inception FID, nor comparable with
    published FIDs: it compares pixel statistics in random directions, and sees little of shapes.

    Images: uint8 pixels (N, H, W[, C]) or floats in [-1, 1] (N, H, W, C), all of one shape. Returns ``n``,
    ``swd``, ``floor``, ``floor_std``.
    """
    def vectors(x, name):
        x = np.asarray(x)
        x = data.scale_pixels(x) if x.dtype == np.uint8 else np.clip(np.asarray(x, np.float32), -1.0, 1.0)
        return _as_points(x.reshape(len(x), -1), name)

    fake, real, pool = vectors(images, "images"), vectors(reference, "reference"), vectors(pool, "pool")
    n = len(fake)
    if not real.shape[1] == fake.shape[1] == pool.shape[1]:
        raise InputError(f"images, reference and pool must be of one shape; got {fake.shape[1]}, {real.shape[1]} "
                         f"and {pool.shape[1]} numbers per image")
    if n > len(pool):
        raise InputError(f"the floor needs n = {n} real images besides the reference, but there are {len(pool)}: "
                         "generate fewer")
    check_whole("num_floor_draws", num_floor_draws, 2)
    rng = np.random.default_rng(seed)
    floors = [sliced_wasserstein(pool[rng.choice(len(pool), n, replace=False)], real, num_projections, seed)
              for _ in range(num_floor_draws)]
    return {"n": n, "swd": sliced_wasserstein(fake, real, num_projections, seed), "floor": float(np.mean(floors)),
            "floor_std": float(np.std(floors, ddof=1))}


def _check_mixture_points(x, mixture: GaussianMixture) -> np.ndarray:
    x = _as_points(x, "x")
    if x.shape[1] != mixture.dim:
        raise InputError(f"x has {x.shape[1]} dimensions but the mixture has {mixture.dim}")
    return x


def mode_weights(x, mixture: GaussianMixture) -> np.ndarray:
    """The fraction of the samples x (N, D) that belong to each component of ``mixture``, shape (K,).

    Each sample goes to the component most likely to have produced it (the
    largest posterior w_k N(x; mu_k, std_k^2 I)); for equal weights and
    standard deviations that is the nearest mean. Compare with
    ``mixture.weights``: a sampler that reproduces the distribution gets
    them back up to sampling noise, about sqrt(w (1 - w) / N).
    """
    x = _check_mixture_points(x, mixture)
    posterior = mixture_lib.component_posterior(mixture, jnp.asarray(x, jnp.float32))
    component = np.argmax(np.asarray(posterior), axis=1)
    return np.bincount(component, minlength=len(mixture.weights)) / len(x)


def missing_modes(x, mixture: GaussianMixture, min_fraction: float = 0.1) -> np.ndarray:
    """Indices of the components that received less than ``min_fraction`` of their weight's share of x.

    With the default 0.1, a component of weight 1/8 is missing from 1,000
    samples when fewer than 12.5 of them fall in it (125 expected). Empty
    when every mode is represented.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise InputError(f"min_fraction must be in (0, 1] (got {min_fraction})")
    observed = mode_weights(x, mixture)
    return np.flatnonzero(observed < min_fraction * np.asarray(mixture.weights, np.float64))
