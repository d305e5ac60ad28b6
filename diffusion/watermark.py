"""Tree-Ring watermarks (Wen et al. 2023): a key in the Fourier transform of the starting noise, found again by
inverting the sampler; and a pixel-space baseline to compare it with.

**Marking.** The starting noise x_T of a generation is i.i.d. N(0, 1). Its 2-D discrete Fourier transform with
the orthonormal scaling (``norm="ortho"``) is a rotation of the same real space, so its coefficients are just as
random: E|F(k)|^2 = 1 at every frequency k, and F(-k) = conj F(k) because x_T is real. A key fixes the
coefficients in a band of frequencies, inner_radius <= |k| <= radius, of one channel (``key_mask``) to values of
its own (``key_values``) and leaves every other coefficient as drawn (``mark``). In pixels,

    x_T' = x_T - P x_T + kappa,

where P projects onto the masked frequencies, a subspace of |M| real dimensions (|M| the masked bins: a
conjugate pair k, -k counts twice, its two real degrees of freedom), and kappa is the key's own pattern. So what
the key changes is exactly that subspace: there the noise is a fixed pattern instead of a random one, and
everywhere else it is the same draw. The key keeps the symmetry F(-k) = conj F(k), so x_T' is real.

The patterns (Wen et al. Sec. 3): **rings**, one real N(0, 1) value per ring round(|k|), constant along it
(a rotation of the spectrum leaves the key in place; a real value is what stays of the paper's complex one once
the inverse transform is made real); **zeros**, every masked coefficient 0; **random**, the coefficients of
another N(0, 1) noise drawn from the key's seed. Rings and random keep E|F|^2 = 1, so the marked noise has the
variance of unmarked noise on average; zeros removes |M| / D of it (D = H W C).

**Where the key lives, and what it costs.** Every image marked with one key shares the key's part of its noise,
so the images lose the variety that part would have drawn. The paper's disc of low frequencies (radius 10 of a
64 × 64 latent) is a sliver of Stable Diffusion's noise; on 28 × 28 pixels the lowest frequencies are the digit's
coarse shape, and a disc of radius 5 (81 of 784 dimensions) took the recall of the digits from 0.79 to 0.13
(classifier FID 11 to 50, n = 1,000). So the default here is a **band of higher frequencies**, 8 <= |k| <= 12
(248 dimensions: 2/7 to 3/7 of the side), filled with the **random** pattern, which the sampler turns into fine
detail and DDIM inversion still recovers: docs/watermarks.md has the measurements behind the choice. Rings in
the same band are found as surely; random is the default because its values are all independent, where rings
have one per ring.

**Detecting.** An image is inverted to its noise x_hat by DDIM inversion (Song et al. 2021, Sec. 4.3:
``diffusion.editing.ddim_invert``, unconditionally: a detector knows neither the label nor the prompt), and the
test statistic is the squared distance to the key in the masked subspace,

    eta = ||P x_hat / sigma_hat - kappa||^2,

with sigma_hat^2 the variance per dimension of the rest of x_hat, which no key touches: the recovered noise is
put back to unit variance first, whatever the inversion did to its scale. Under the null (the image was not made
from noise marked with this key) and inversion exact, P x_hat / sigma is N(0, I_|M|) noise, so with the true
sigma eta would follow a noncentral chi-squared law with |M| degrees of freedom and noncentrality ||kappa||^2; the
p-value is the chance of a distance this small, P(eta_null <= eta) (``p_values``). This is the paper's test (Sec. 3.3), except that the paper
estimates sigma^2 from the masked values themselves, which for the zeros key makes eta the same for every image.
With sigma_hat in place of sigma the law is exact once sigma_hat's own spread is taken in: sigma_hat^2 / sigma^2
= s^2 is chi-squared with D - |M| degrees of freedom over D - |M|, independent of P x_hat, and given s, s^2 eta is
noncentral chi-squared with noncentrality s^2 ||kappa||^2; the p-value averages that law over s (for the zeros key
this is the F(|M|, D - |M|) law of eta / |M|). How well the null holds for inverted images, where inversion is not
exact, is measured in benchmarks/watermarks.py and docs/watermarks.md.

**Baseline.** ``spread_spectrum_mark`` adds a secret +-delta pattern to the finished pixels (Cox et al. 1997);
``spread_spectrum_p_values`` tests the correlation with it, which needs no model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from scipy import stats

from diffusion import editing, generate, pictures, runs
from diffusion.configs import LatentConfig, TextConfig
from diffusion.errors import GenerationError, is_whole

PATTERNS = ("rings", "zeros", "random")
MAX_SEED = 2**32 - 1
DEFAULT_DETECTION_STEPS = 10  # DDIM inversion steps: Wen et al. invert with 50; on the digit model 10 find the key
# more surely (every clean marked digit of two keys that 50 steps found in 82 % and 91 %: docs/watermarks.md)


@dataclasses.dataclass(frozen=True)
class Key:
    """A Tree-Ring key: its secret seed, pattern, the band of frequencies inner_radius <= |k| <= radius it fills
    (None: 2/7 and 3/7 of the noise's side, 8 and 12 on 28 × 28; inner_radius 0 is the paper's disc) and the
    channel it lives in. Whoever holds it can mark and detect."""

    seed: int
    pattern: str = "random"
    radius: float | None = None
    inner_radius: float | None = None
    channel: int = 0

    def __post_init__(self):
        if not (is_whole(self.seed, 0) and self.seed <= MAX_SEED):
            raise GenerationError(f"a watermark key's seed is a whole number from 0 to {MAX_SEED} (got {self.seed!r})")
        if self.pattern not in PATTERNS:
            raise GenerationError(f"unknown watermark pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        if self.radius is not None and not (isinstance(self.radius, (int, float)) and self.radius >= 0.5):
            raise GenerationError(f"the watermark radius is a number >= 0.5 frequencies (got {self.radius!r})")
        if self.inner_radius is not None and not (isinstance(self.inner_radius, (int, float)) and self.inner_radius >= 0):
            raise GenerationError(f"the watermark's inner radius is a number >= 0 (got {self.inner_radius!r})")
        if not is_whole(self.channel, 0):
            raise GenerationError(f"the watermark channel is a whole number >= 0 (got {self.channel!r})")


def _band(key: Key, shape) -> tuple[float, float]:
    """The key's (inner radius, radius) for noise of ``shape`` (H, W, C), checked to fit."""
    height, width, channels = shape
    side = min(height, width)
    radius = 3 * side / 7 if key.radius is None else key.radius
    inner = 2 * side / 7 if key.inner_radius is None else key.inner_radius
    if radius >= side / 2:
        raise GenerationError(
            f"a watermark of radius {radius:g} does not fit the {height}×{width} noise of this model: "
            f"give a radius below {side / 2:g}"
        )
    k = _frequency_radius(height, width)
    if not np.any((k >= inner) & (k <= radius)):
        raise GenerationError(
            f"no frequency k of the {height}×{width} noise has {inner:g} <= |k| <= {radius:g}: give the watermark a "
            "wider band (a smaller inner radius or a larger radius)"
        )
    if key.channel >= channels:
        raise GenerationError(
            f"this model's noise has {channels} channel(s): the watermark channel is 0 to {channels - 1}"
        )
    return inner, radius


def _frequency_radius(height: int, width: int) -> np.ndarray:
    """|k| of every bin of an unshifted (H, W) transform, with signed integer frequencies."""
    ky = np.fft.fftfreq(height) * height
    kx = np.fft.fftfreq(width) * width
    return np.hypot(ky[:, None], kx[None, :])


def key_mask(key: Key, shape) -> np.ndarray:
    """Where the key lives: a boolean (H, W, C) mask over the unshifted frequencies, the band
    inner_radius <= |k| <= radius in the key's channel. It holds k whenever it holds -k."""
    height, width, channels = shape
    inner, radius = _band(key, shape)
    k = _frequency_radius(height, width)
    mask = np.zeros(shape, bool)
    mask[..., key.channel] = (k >= inner) & (k <= radius)
    return mask


def key_values(key: Key, shape) -> np.ndarray:
    """The key's Fourier coefficients, complex (H, W, C), zero outside ``key_mask``; Hermitian (the value at -k
    is the conjugate of the value at k), so that their inverse transform is real."""
    mask = key_mask(key, shape)
    rng = np.random.default_rng(key.seed)
    if key.pattern == "rings":
        r = _frequency_radius(*shape[:2])
        ring_values = rng.standard_normal(int(np.ceil(_band(key, shape)[1])) + 1)
        values = np.broadcast_to(ring_values[np.rint(r).astype(int).clip(max=len(ring_values) - 1)][..., None], shape)
    elif key.pattern == "random":
        values = np.fft.fft2(rng.standard_normal(shape), axes=(0, 1), norm="ortho")
    else:
        values = np.zeros(shape)
    return np.where(mask, values, 0.0).astype(np.complex128)


def _spectrum(x):
    return jnp.fft.fft2(x, axes=(-3, -2), norm="ortho")


def mark(noise, key: Key):
    """Noise (..., H, W, C) with the key written into its masked Fourier coefficients (Wen et al. 2023, Sec. 3.2);
    every other coefficient is left as it was."""
    noise = jnp.asarray(noise)
    shape = noise.shape[-3:]
    mask, values = key_mask(key, shape), key_values(key, shape).astype(np.complex64)
    spectrum = jnp.where(mask, values, _spectrum(noise))
    return jnp.fft.ifft2(spectrum, axes=(-3, -2), norm="ortho").real.astype(noise.dtype)


class Statistic(NamedTuple):
    """The detector's test statistic per image, eta, and its law under the null: noncentral chi-squared with
    ``dof`` = |M| degrees of freedom and noncentrality ||kappa||^2."""

    eta: np.ndarray
    dof: int
    noncentrality: float


def statistic(noise, key: Key) -> Statistic:
    """eta = ||P x / sigma_hat - kappa||^2 for each noise x (n, H, W, C) recovered from an image, where sigma_hat^2
    is the variance per dimension of x's unmasked frequencies (see the module docstring)."""
    noise = np.asarray(noise, np.float64)
    shape = noise.shape[-3:]
    mask, values = key_mask(key, shape), key_values(key, shape)
    spectrum = np.fft.fft2(noise, axes=(-3, -2), norm="ortho")
    dof = int(mask.sum())
    sigma = np.sqrt(np.sum(np.abs(spectrum) ** 2 * ~mask, axis=(-3, -2, -1)) / (mask.size - dof))
    distance = np.abs(spectrum / sigma[..., None, None, None] - values) ** 2
    return Statistic(np.sum(distance * mask, axis=(-3, -2, -1)), dof, float(np.sum(np.abs(values) ** 2)))


SCALE_QUADRATURE = 256  # points of the average over the scale estimate's law in ``p_values``


def p_values(noise, key: Key) -> np.ndarray:
    """The chance that noise not marked with ``key`` lies this close to it, P(eta_null <= eta) (small: the key is
    there): the noncentral chi-squared law of ``statistic`` given the scale estimate, averaged over that estimate's
    chi-squared law (the module docstring) by the midpoint rule on its quantiles."""
    eta, dof, noncentrality = statistic(noise, key)
    rest = int(np.prod(np.shape(noise)[-3:])) - dof
    s2 = stats.chi2.ppf((np.arange(SCALE_QUADRATURE) + 0.5) / SCALE_QUADRATURE, rest) / rest
    return np.mean(stats.ncx2.cdf(np.asarray(eta)[..., None] * s2, dof, s2 * noncentrality), axis=-1)


# --- Detecting in images --------------------------------------------------------------------


def check_detectable(config) -> None:
    """Raise a GenerationError unless images of this model can be inverted by DDIM to their starting noise."""
    if config.parameterization == "velocity":
        raise GenerationError(
            "watermark detection inverts DDIM, which needs a model on a noise schedule; this is a flow-matching model"
        )
    if config.kind == "distill":
        raise GenerationError(
            "watermark detection inverts DDIM on the model that made the image; a distilled student does not "
            f"follow DDIM's path: detect with its teacher, --checkpoint {config.teacher}"
        )


def recover_noise(loaded: runs.Loaded, images, *, steps: int = DEFAULT_DETECTION_STEPS, batch_size: int = 64):
    """The starting noise (n, h, w, c) from which DDIM would draw each image (n, H, W, C, model range): DDIM
    inversion with the null label or the empty prompt and no guidance; a latent model's images are encoded first."""
    config = loaded.config
    check_detectable(config)
    images = jnp.asarray(images, jnp.float32)
    if isinstance(config, LatentConfig):
        images = runs.load_latent_space(config, runs.run_folder(loaded.checkpoint.path)).encode(images)
    if isinstance(config, TextConfig):
        null = config.tokenizer.empty_ids
    else:
        null = config.num_classes if config.num_classes else None
    settings = dict(schedule=config.noise_schedule, steps=steps, parameterization=config.parameterization)
    recovered = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch) if len(images) > batch_size else 0  # one compiled shape for every batch
        batch = jnp.concatenate([batch, jnp.zeros((pad, *batch.shape[1:]), batch.dtype)])
        cond = None if null is None else np.broadcast_to(np.asarray(null, np.int32), (len(batch), *np.shape(null)))
        x = editing.ddim_invert(loaded.denoiser, batch, cond=cond, **settings).x
        recovered.append(np.asarray(x[: len(batch) - pad]))
    return np.concatenate(recovered)


NULL_FIRST_SEED = 2**31  # the null's generations use seeds from here up, far from those people type


def generations(checkpoint: runs.Checkpoint, n: int, first_seed: int = 0, key: Key | None = None, **choices):
    """n images of the checkpoint as sample.py saves them (8 bits a pixel), each from a noise of its own: seed
    first_seed + i with the i-th class in turn (or example prompt), marked with ``key`` if given; ``choices`` are
    Settings fields over the defaults. Returns (images (n, H, W, C) in the model's range, the label or prompt of
    each). One noise per image, unlike a grid's rows, so that n images are n independent draws of the test."""
    columns = generate.default_settings(checkpoint, **choices).columns  # every class, or the example prompts
    images, conditions = [None] * n, [None] * n
    for j, column in enumerate(columns):
        index = list(range(j, n, len(columns)))
        if not index:
            continue
        condition = dict(prompts=(column,)) if isinstance(checkpoint.config, TextConfig) else dict(labels=(column,))
        settings = generate.default_settings(
            checkpoint, **{**choices, **condition}, seeds=tuple(first_seed + i for i in index),
            watermarked=key is not None,
        )
        drawn = generate.generate(settings, checkpoint=checkpoint, watermark_key=key).images
        for i, image in zip(index, drawn):
            images[i], conditions[i] = image, column
    return pictures.as_saved(np.stack(images)), conditions


def null_noise(checkpoint: runs.Checkpoint, n: int, *, steps: int = DEFAULT_DETECTION_STEPS):
    """The recovered noise of n unmarked generations of the checkpoint at its default settings (``generations``
    from seed ``NULL_FIRST_SEED``): the empirical null that ``empirical_p_values`` compares with."""
    images, _ = generations(checkpoint, n, NULL_FIRST_SEED)
    return recover_noise(runs.load(checkpoint), images, steps=steps)


def empirical_p_values(eta, null_eta) -> np.ndarray:
    """p = (1 + #{null eta <= eta}) / (1 + m) for m null statistics: the permutation-test p-value, valid whatever
    the law of eta, when the tested image is drawn like the null's images (Phipson & Smyth 2010); at least
    1 / (1 + m)."""
    eta, null_eta = np.asarray(eta), np.sort(np.asarray(null_eta))
    return (1.0 + np.searchsorted(null_eta, eta, side="right")) / (1.0 + len(null_eta))


class Detection(NamedTuple):
    """What ``detect`` finds per image: the p-value (empirical if a null was given, else chi-squared), the
    chi-squared p-value, and the statistic they come from."""

    p_value: np.ndarray
    chi_squared_p_value: np.ndarray
    statistic: Statistic


def find_key(noise, key: Key, null=None) -> Detection:
    """Test recovered noise (n, H, W, C) for ``key``: the statistic, its chi-squared p-value, and with ``null``
    (``null_noise``, recovered at the same steps) its empirical one."""
    found, chi_squared = statistic(noise, key), p_values(noise, key)
    p = chi_squared if null is None else empirical_p_values(found.eta, statistic(null, key).eta)
    return Detection(p, chi_squared, found)


def detect(loaded: runs.Loaded, images, key: Key, *, steps: int = DEFAULT_DETECTION_STEPS, null=None) -> Detection:
    """Test images (n, H, W, C, model range) for ``key``: DDIM inversion to their noise (``recover_noise``), then
    ``find_key``."""
    return find_key(recover_noise(loaded, images, steps=steps), key, null)


# --- The baseline: a pattern in the pixels ----------------------------------------------------


def spread_spectrum_pattern(seed: int, shape) -> np.ndarray:
    """The baseline's secret: a +-1 pattern of ``shape`` (H, W, C) from ``seed``."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=shape)


def spread_spectrum_mark(images, seed: int, delta: float) -> np.ndarray:
    """Images (n, H, W, C, model range) with delta times the secret +-1 pattern added, clipped to [-1, 1]: the
    classic additive spread-spectrum watermark (Cox et al. 1997), applied after generation."""
    images = np.asarray(images, np.float64)
    return np.clip(images + delta * spread_spectrum_pattern(seed, images.shape[1:]), -1.0, 1.0)


def spread_spectrum_p_values(images, seed: int) -> np.ndarray:
    """One-sided p-values of the correlation z = <p, x - mean x> / ||x - mean x|| with the secret pattern p.

    For an image independent of p, z is a sum of D random +-1 signs weighted by the centred pixels, so it is
    N(0, 1) to the central limit (exactly mean 0 and variance 1, whatever the image): p = 1 - Phi(z)."""
    images = np.asarray(images, np.float64)
    centred = images - images.mean(axis=(1, 2, 3), keepdims=True)
    pattern = spread_spectrum_pattern(seed, images.shape[1:])
    norm = np.sqrt(np.sum(centred**2, axis=(1, 2, 3)))
    z = np.sum(centred * pattern, axis=(1, 2, 3)) / np.maximum(norm, 1e-12)
    return stats.norm.sf(z)


def roc(scores_marked, scores_unmarked) -> tuple[float, float]:
    """(ROC AUC, true-positive rate at a 1 % false-positive rate) of a detector whose score is larger for marked
    images; the threshold is the empirical 99th percentile of the unmarked scores."""
    marked, unmarked = np.asarray(scores_marked, float), np.asarray(scores_unmarked, float)
    greater = (marked[:, None] > unmarked[None, :]).mean() + 0.5 * (marked[:, None] == unmarked[None, :]).mean()
    threshold = np.quantile(unmarked, 0.99, method="higher")
    return float(greater), float(np.mean(marked > threshold))


def score(p) -> np.ndarray:
    """A detector's score from its p-values: -log10 p (larger: more surely marked), finite where p underflows."""
    return -np.log10(np.maximum(np.asarray(p, float), 1e-300))

