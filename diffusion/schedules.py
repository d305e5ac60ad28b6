"""Noise schedules: how much signal survives at each step of the forward process.

A DDPM-style ("variance preserving") diffusion adds a little Gaussian noise at
each of T steps, step t having variance beta_t (Ho et al. 2020, eq. 2):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Everything else follows from the betas:

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s           (the signal's share of variance)
    sigma_t     = sqrt((1 - alpha_bar_t) / alpha_bar_t)   (noise-to-signal ratio,
                                                   Karras et al. 2022's "sigma")
    snr_t       = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2
    log_snr_t   = log(snr_t)                      (Kingma et al. 2021's lambda)

Indexing: arrays are indexed t = 0 .. T-1, as in most code; index t is the
paper's timestep t + 1, so ``alpha_bar[0]`` is after one noising step and
``alpha_bar[T-1]`` is the end of the chain.

This module also holds what samplers need to walk back down the chain: the
integer timesteps of an N-step sampler (``timesteps``), continuous sigma(t) and
t(sigma), Karras sigmas and the rectified-flow time grid.

Schedules are computed once on the host in float64 NumPy; a ``Schedule`` is a
small frozen (hashable) object, so jit can take it as a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from diffusion.errors import InputError, check_whole, is_whole

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("linspace", "leading", "trailing")

# (beta_start, beta_end) used when none are given; cosine has none.
DEFAULT_BETA_RANGE = {
    "linear": (1e-4, 0.02),  # Ho et al. 2020, Sec. 4
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion (Rombach et al. 2022)
    "sigmoid": (1e-4, 0.02),
}

# With zero-terminal SNR the last alpha_bar is exactly 0 and its sigma is
# infinite. Samplers that work in sigma space replace it by this tiny value,
# as the common implementations do.
ALPHA_BAR_FLOOR = 2.0**-24


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas evenly spaced from beta_start to beta_end (Ho et al. 2020, Sec. 4)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Square roots of the betas evenly spaced, then squared (Stable Diffusion's schedule)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose alpha_bar follows a squared cosine (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2,
    and beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at ``max_beta`` = 0.999
    so that the last steps do not become singular (their Sec. 3.2).
    """
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    return np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas following a logistic curve from beta_start to beta_end.

    beta_t = beta_start + (beta_end - beta_start) * sigmoid(x_t), x_t evenly
    spaced on [-6, 6] (the "sigmoid" beta schedule of GeoDiff, Xu et al. 2022,
    as found in common diffusion libraries).
    """
    x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has exactly zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first
    value is unchanged; the betas are then recovered from the new alpha_bar.
    Without this, the "pure noise" a sampler starts from still carries a little
    signal at training time (e.g. sqrt(alpha_bar[T-1]) = 0.068 for Stable
    Diffusion's schedule), which the model learns to rely on.
    """
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule of ``num_timesteps`` (T) steps.

    Fields are the settings; the arrays (``betas``, ``alpha_bar``, ``sigmas``,
    ``snr``, ...) are derived from them on first use, in float64. Being frozen
    and made of plain values, a Schedule is hashable and can be a static
    argument of ``jax.jit``.

    >>> s = Schedule("linear", 1000)
    >>> float(s.alpha_bar[-1])  # about 4.036e-5
    """

    name: str = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.name not in BETA_SCHEDULES:
            raise InputError(f"unknown noise schedule {self.name!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        if not is_whole(self.num_timesteps, 1):
            raise InputError(f"num_timesteps must be a whole number >= 1 (got {self.num_timesteps!r}); 1000 is usual")
        if self.name == "cosine":
            if self.beta_start is not None or self.beta_end is not None:
                raise InputError("the cosine schedule has no beta_start / beta_end; leave them unset")
            return
        start, end = DEFAULT_BETA_RANGE[self.name]
        start = start if self.beta_start is None else float(self.beta_start)
        end = end if self.beta_end is None else float(self.beta_end)
        if not 0.0 < start <= end < 1.0:
            raise InputError(
                f"betas must satisfy 0 < beta_start <= beta_end < 1 (got beta_start={start}, beta_end={end}); "
                f"the usual {self.name} range is {DEFAULT_BETA_RANGE[self.name]}"
            )
        # Store the resolved values so that equal schedules compare (and hash) equal.
        object.__setattr__(self, "beta_start", start)
        object.__setattr__(self, "beta_end", end)

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """Per-step noise variances beta_t, shape (T,)."""
        T = int(self.num_timesteps)
        if self.name == "cosine":
            betas = cosine_betas(T)
        else:
            make = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "sigmoid": sigmoid_betas}
            betas = make[self.name](T, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        betas.flags.writeable = False
        return betas

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        """alpha_t = 1 - beta_t."""
        return _frozen(1.0 - self.betas)

    @functools.cached_property
    def alpha_bar(self) -> np.ndarray:
        """alpha_bar_t = prod_{s<=t} alpha_s: the signal's share of the variance of x_t (Ho et al. eq. 4)."""
        alpha_bar = np.cumprod(self.alphas)
        if self.zero_terminal_snr:
            alpha_bar[-1] = 0.0  # exact, rather than a rounding error away from it
        return _frozen(alpha_bar)

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t).

        Infinite at the last step of a zero-terminal-SNR schedule.
        """
        with np.errstate(divide="ignore"):
            return _frozen(np.sqrt((1.0 - self.alpha_bar) / self.alpha_bar))

    @functools.cached_property
    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2 (Kingma et al. 2021)."""
        return _frozen(self.alpha_bar / (1.0 - self.alpha_bar))

    @functools.cached_property
    def log_snr(self) -> np.ndarray:
        """log(snr_t), the "lambda" of VDM and DPM-Solver; -inf at a zero-terminal-SNR end."""
        with np.errstate(divide="ignore"):
            return _frozen(np.log(self.snr))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def alpha_bar_from_sigma(sigma):
    """alpha_bar = 1 / (1 + sigma^2), the inverse of ``Schedule.sigmas``."""
    return 1.0 / (1.0 + sigma**2)


# --- What samplers need ----------------------------------------------------------


def timesteps(schedule: Schedule, steps: int, spacing: str = "leading", offset: int = 0) -> np.ndarray:
    """The integer timesteps, from noisy to clean, that an N-step sampler visits.

    The three spacings of Lin et al. 2023, Table 2 (T = ``num_timesteps``, N = ``steps``):

    - ``linspace``: N points evenly spaced over [0, T-1], rounded; the first is T-1.
    - ``leading``: multiples of T // N starting from 0, plus ``offset``; the
      first is well below T-1 (e.g. 900 of 999 for N = 10), so the sampler
      never starts from the noisiest level.
    - ``trailing``: counted down from T by T / N and rounded, minus one; always
      starts at T-1, which is what zero-terminal SNR needs.

    Returns a descending int64 array of length N, the same integers that the
    widely used implementations give for the same settings.
    """
    T = schedule.num_timesteps
    if spacing not in SPACINGS:
        raise InputError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not is_whole(steps, 1) or steps > T:
        raise InputError(f"steps must be a whole number from 1 to the schedule's {T} timesteps (got {steps!r})")
    if offset and spacing != "leading":
        raise InputError("offset applies only to 'leading' spacing")
    if spacing == "linspace":
        t = np.round(np.linspace(0, T - 1, steps))[::-1]
    elif spacing == "leading":
        t = (np.arange(steps) * (T // steps))[::-1] + offset
    else:
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    if t.min() < 0 or t.max() > T - 1:
        raise InputError(f"offset {offset} pushes timesteps outside [0, {T - 1}]")
    return t.astype(np.int64)


# LCM's origin grid: the 50 timesteps 19, 39, ..., 999 of a 1000-step schedule (its original_inference_steps).
LCM_ORIGIN_STEPS = 50


def origin_timesteps(num_timesteps: int, origin_steps: int = LCM_ORIGIN_STEPS) -> np.ndarray:
    """LCM's "origin" grid, ascending: k - 1, 2k - 1, ..., origin_steps k - 1 with the skipping step
    k = num_timesteps // origin_steps (Luo et al. 2023, Sec. 4.3): the timesteps consistency distillation
    trains on, one teacher step of k timesteps apart."""
    if not is_whole(origin_steps, 1) or origin_steps > num_timesteps:
        raise InputError(f"origin_steps must be a whole number from 1 to {num_timesteps} (got {origin_steps!r})")
    return np.arange(1, origin_steps + 1) * (num_timesteps // origin_steps) - 1


def lcm_timesteps(schedule: Schedule, steps: int, origin_steps: int = LCM_ORIGIN_STEPS) -> np.ndarray:
    """The timesteps of LCM's multistep sampler, from noisy to clean, as the widely used LCMScheduler lays
    them out: ``steps`` of the ``origin_timesteps``, counted from the top at the evenly spaced indices
    floor(i * origin_steps / steps) (4 of 50: 999, 759, 499, 259)."""
    origin = origin_timesteps(schedule.num_timesteps, origin_steps)[::-1]
    if not is_whole(steps, 1) or steps > origin_steps:
        raise InputError(f"the lcm sampler takes 1 to {origin_steps} steps, its origin grid (got {steps!r})")
    return origin[np.floor(np.linspace(0, origin_steps, steps, endpoint=False)).astype(np.int64)]


def _log_sigmas(schedule: Schedule) -> np.ndarray:
    alpha_bar = np.maximum(schedule.alpha_bar, ALPHA_BAR_FLOOR)
    return 0.5 * np.log((1.0 - alpha_bar) / alpha_bar)


def sigma_at(schedule: Schedule, t):
    """Continuous sigma(t) for fractional timesteps t in [0, T-1].

    Linear interpolation of log sigma between integer timesteps, so that
    ``sigma_at(s, k) == s.sigmas[k]`` at integers. Traceable by JAX.
    """
    log_sigmas = jnp.asarray(_log_sigmas(schedule), jnp.float32)
    return jnp.exp(jnp.interp(t, jnp.arange(schedule.num_timesteps, dtype=jnp.float32), log_sigmas))


def timestep_at(schedule: Schedule, sigma):
    """The fractional timestep whose sigma is ``sigma``: the inverse of ``sigma_at``.

    Lets a network trained on integer timesteps be called at any sigma, as
    sigma-space samplers (Euler, Heun, DPM++) need. Traceable by JAX; sigmas
    outside the schedule's range are clamped to its ends.
    """
    log_sigmas = jnp.asarray(_log_sigmas(schedule), jnp.float32)
    return jnp.interp(jnp.log(sigma), log_sigmas, jnp.arange(schedule.num_timesteps, dtype=jnp.float32))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The N noise levels of Karras et al. 2022, eq. 5, followed by a final 0.

    sigma_i = (sigma_max^(1/rho) + i / (N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    rho = 7 spends more steps at low noise, where detail is decided.
    """
    check_whole("steps", steps, 1)
    if not 0.0 < sigma_min < sigma_max:
        raise InputError(f"need 0 < sigma_min < sigma_max (got {sigma_min}, {sigma_max})")
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return np.concatenate([sigmas, [0.0]])


def flow_timesteps(steps: int, shift: float = 1.0) -> np.ndarray:
    """Times t from 1 (noise) to 0 (data) for a rectified-flow sampler, N + 1 points.

    On the rectified-flow path x_t = (1 - t) x_0 + t eps (Liu et al. 2023;
    Lipman et al. 2023) the grid is uniform in t, then optionally shifted
    towards the noisy end by t' = shift * t / (1 + (shift - 1) * t), the
    resolution-dependent timestep shift of Esser et al. 2024 (SD3), eq. 23.
    """
    check_whole("steps", steps, 1)
    if shift <= 0:
        raise InputError(f"shift must be positive (got {shift}); 1.0 means no shift")
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)
