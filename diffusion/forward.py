"""The forward (noising) process, and the one place where parameterizations meet.

Every diffusion in this package writes a noisy sample as

    x_t = signal_scale * x_0 + noise_scale * eps,      eps ~ N(0, I).

The two scales are what Kingma et al. 2021 call alpha_t and sigma_t; we spell
them out to keep "sigma" for Karras et al.'s noise-to-signal ratio:

- variance preserving (DDPM):  signal = sqrt(alpha_bar_t), noise = sqrt(1 - alpha_bar_t)
- sigma space (EDM / k-diffusion, x scaled by 1 / sqrt(alpha_bar)):  signal = 1, noise = sigma
- rectified flow:  signal = 1 - t, noise = t

A network can be trained to predict any of eps, x_0, v or (for flows) the
velocity; ``to_x0_eps`` and ``from_x0_eps`` convert among them, so samplers
never care which one a model uses. A consistency model (``diffusion.distillation``)
wraps its network's x0_hat as ``consistency_function``.

All functions here are pure and traceable by JAX. Timesteps ``t`` index the
schedule's arrays (0 .. T-1, see ``diffusion.schedules``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion.errors import InputError
from diffusion.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v", "score", "velocity")


def expand_to(a, x):
    """Reshape a per-example array of shape (B,) (or a scalar) to broadcast against x of shape (B, ...)."""
    a = jnp.asarray(a, dtype=x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _gather(values, t, x):
    """values[t] as a float array of x's dtype, shaped to broadcast against x."""
    return expand_to(jnp.asarray(values, dtype=x.dtype)[t], x)


def vp_scales(schedule: Schedule, t, x):
    """(signal_scale, noise_scale) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), broadcast against x."""
    # Both square roots are taken in float64 (1 - alpha_bar is about 1e-4 at t = 0).
    return _gather(np.sqrt(schedule.alpha_bar), t, x), _gather(np.sqrt(1.0 - schedule.alpha_bar), t, x)


def q_sample(schedule: Schedule, x0, t, noise):
    """Sample q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4).

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: one jump to any
    timestep, instead of t small steps. ``t`` has shape (B,) or is a scalar.
    """
    signal, noise_scale = vp_scales(schedule, t, x0)
    return signal * x0 + noise_scale * noise


def q_step(schedule: Schedule, x_prev, t, noise):
    """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020, eq. 2).

    ``x_prev`` is the sample at index t - 1 (x_0 itself for t = 0).
    """
    beta = _gather(schedule.betas, t, x_prev)
    return jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * noise


def posterior_coefficients(alpha_bar, alpha_bar_prev):
    """The DDPM posterior q(x_prev | x_t, x_0) of a jump from alpha_bar to alpha_bar_prev (Ho et al. 2020, eq. 6-7).

    Returns (coef_x0, coef_xt, variance), the posterior being
    N(coef_x0 x_0 + coef_xt x_t, variance I):

        alpha    = alpha_bar / alpha_bar_prev,  beta = 1 - alpha
        coef_x0  = sqrt(alpha_bar_prev) beta / (1 - alpha_bar)
        coef_xt  = sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) beta      ("beta tilde")

    On the full schedule alpha and beta are one step's alpha_t and beta_t, as
    in the paper; a sampler that skips timesteps gets those of the whole jump.
    Plain arithmetic, so NumPy arrays give NumPy results (float64 on the host)
    and JAX arrays JAX ones (traced inside a sampler).
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    coef_x0 = alpha_bar_prev**0.5 * beta / (1.0 - alpha_bar)
    coef_xt = alpha**0.5 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta
    return coef_x0, coef_xt, variance


def posterior_mean_variance(schedule: Schedule, x0, x_t, t):
    """Mean and variance of the posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7).

    ``posterior_coefficients`` for the one step from alpha_bar_t to
    alpha_bar_{t-1}, so that beta is beta_t and the variance beta_tilde_t. At
    t = 0 the previous level is the data itself (alpha_bar_{-1} = 1), so the
    mean is x_0 and the variance 0.
    """
    # The coefficients are formed in float64 on the host: 1 - alpha_bar is tiny at small t,
    # and forming it in float32 would lose most of its digits.
    alpha_bar_prev = np.concatenate([[1.0], schedule.alpha_bar[:-1]])
    coef_x0, coef_xt, variance = posterior_coefficients(schedule.alpha_bar, alpha_bar_prev)
    mean = _gather(coef_x0, t, x_t) * x0 + _gather(coef_xt, t, x_t) * x_t
    return mean, _gather(variance, t, x_t)


# --- Parameterizations ---------------------------------------------------------------


def _check_kind(kind):
    if kind not in PARAMETERIZATIONS:
        raise InputError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMETERIZATIONS)}")


def to_x0_eps(prediction, kind: str, x_t, signal_scale, noise_scale):
    """Recover (x_0, eps) from a model's ``prediction`` of the given ``kind``.

    With x_t = a x_0 + s eps (a = signal_scale, s = noise_scale):

    - ``eps``:      x_0 = (x_t - s eps) / a
    - ``x0``:       eps = (x_t - a x_0) / s
    - ``v``:        v = a eps - s x_0 (Salimans & Ho 2022, Sec. 4), so
                    x_0 = (a x_t - s v) / (a^2 + s^2), eps = (s x_t + a v) / (a^2 + s^2)
    - ``score``:    grad log p(x_t) = -eps / s (Song et al. 2021), so eps = -s score
    - ``velocity``: u = eps - x_0 on the rectified-flow path (a = 1 - t, s = t;
                    Liu et al. 2023), so x_0 = x_t - s u and eps = x_t + a u.
    """
    _check_kind(kind)
    a, s = signal_scale, noise_scale
    if kind == "eps":
        eps = prediction
        return (x_t - s * eps) / a, eps
    if kind == "x0":
        x0 = prediction
        return x0, (x_t - a * x0) / s
    if kind == "v":
        norm = a**2 + s**2
        return (a * x_t - s * prediction) / norm, (s * x_t + a * prediction) / norm
    if kind == "score":
        eps = -s * prediction
        return (x_t - s * eps) / a, eps
    return x_t - s * prediction, x_t + a * prediction


def from_x0_eps(x0, eps, kind: str, signal_scale, noise_scale):
    """The prediction of the given ``kind`` that corresponds to (x_0, eps); the inverse of ``to_x0_eps``."""
    _check_kind(kind)
    a, s = signal_scale, noise_scale
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    return eps - x0


def convert(prediction, from_kind: str, to_kind: str, x_t, signal_scale, noise_scale):
    """Convert a prediction between parameterizations at the same noisy point x_t."""
    x0, eps = to_x0_eps(prediction, from_kind, x_t, signal_scale, noise_scale)
    return from_x0_eps(x0, eps, to_kind, signal_scale, noise_scale)


# --- Rectified flow ------------------------------------------------------------------


def flow_interpolate(x0, noise, t):
    """A point on the rectified-flow path x_t = (1 - t) x_0 + t eps (Liu et al. 2023; Lipman et al. 2023).

    t = 0 is data and t = 1 is pure noise; ``t`` has shape (B,) or is a scalar.
    """
    t = expand_to(t, x0)
    return (1.0 - t) * x0 + t * noise


def flow_velocity(x0, noise):
    """d x_t / dt = eps - x_0 along the straight path: the flow-matching regression target."""
    return noise - x0


# --- Consistency models ----------------------------------------------------------------
#
# LCM's boundary scalings (as in the widely used LCMScheduler): sigma_data = 0.5, and timesteps multiplied by 10
# before they enter c_skip and c_out, so that f is the network's x0_hat at every timestep but t = 0.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA):
    """(c_skip(t), c_out(t)) of a consistency model (Song et al. 2023, eq. 7 and App. C; LCM, Sec. 4.1).

    c_skip = sigma_data^2 / ((k t)^2 + sigma_data^2), c_out = k t / sqrt((k t)^2 + sigma_data^2),
    with k = ``timestep_scaling`` and t the timestep: c_skip(0) = 1 and c_out(0) = 0.
    """
    scaled = timestep_scaling * jnp.asarray(t)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


def consistency_function(x0_hat, x_t, t):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (Song et al. 2023, eq. 7), t a scalar or one per example:
    a network's x0_hat made into a consistency function, for which f(x, 0) = x holds exactly."""
    c_skip, c_out = boundary_scalings(t)
    return expand_to(c_skip, x_t) * x_t + expand_to(c_out, x_t) * x0_hat
