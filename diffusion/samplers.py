"""The reverse process: turning noise into data, with the samplers users meet in image tools.

A sampler walks a trained denoiser down a grid of N noise levels, from pure
noise (frame 0) to data (frame N). Every sampler here is one short ``*_step``
function -- read it beside the paper it names -- and they all share one driver,
``sample``, that validates the settings on the host, then runs the steps as one
compiled XLA program (``lax.scan``), or, for debugging, the same step function
in a Python loop.

The sixteen samplers of the registry ``SAMPLERS`` fall into three families, by the
variable they step in:

- ``vp`` (``ddpm``, ``ddim``, ``plms``, ``lcm``): the DDPM sample x_t = sqrt(alpha_bar) x_0
  + sqrt(1 - alpha_bar) eps itself, on the integer training timesteps (``lcm`` is
  for consistency-distilled models only, ``diffusion.distillation``).
- ``sigma`` (``euler``, ``euler_a``, ``heun``, ``dpmpp_2m``, ``dpmpp_2m_karras``, ``unipc``,
  ``dpmpp_sde``, ``dpmpp_sde_karras``, ``dpmpp_2m_sde``, ``dpmpp_2m_sde_karras``):
  Karras et al.'s x = x_t / sqrt(alpha_bar) = x_0 + sigma eps, where the
  probability-flow ODE is simply dx/dsigma = (x - x0_hat) / sigma; the network
  is called at the fractional timestep of each sigma.
- ``flow`` (``flow_euler``, ``flow_heun``): the rectified-flow path x_t = (1 - t)
  x_0 + t eps, whose ODE dx/dt = v has the very same form (v = (x - x0_hat) / t),
  so it reuses the sigma-space Euler and Heun steps with sigma = t.

A denoiser is any JAX-traceable ``(x, t, cond) -> prediction`` (t of shape (B,),
float), in a parameterization declared by the caller (eps, x0, v, score, or
velocity for flows); ``diffusion.forward`` converts predictions. Grids follow
the widely used implementations (see docs/samplers.md for every convention).

Guidance in an interval of noise levels (``diffusion.guidance``) is decided once
per step, by the step's own time, so that all of a step's network calls see one
and the same field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion import forward
from diffusion.errors import InputError, check_whole
from diffusion.guidance import Guided
from diffusion.schedules import (
    LCM_ORIGIN_STEPS, Schedule, flow_timesteps, karras_sigmas, lcm_timesteps, sigma_at, timestep_at, timesteps,
)

# --- Grids: where the steps go, computed on the host --------------------------------


class VPGrid(NamedTuple):
    """The grid of a DDPM-space sampler: N steps between N + 1 frames.

    ``timesteps[i]`` is the network's timestep at step i; ``alpha_bar[k]`` is the
    signal share of frame k, ending at 1 (clean data), the "set alpha to one"
    final step of the common DDIM implementations.
    """

    timesteps: Any  # (N,)
    alpha_bar: Any  # (N + 1,)


class SigmaGrid(NamedTuple):
    """The grid of a sigma-space or flow sampler: N steps between N + 1 frames.

    ``sigmas[k]`` is the noise level of frame k, ending at 0: Karras et al.'s
    sigma for diffusion, the time t of x_t = (1 - t) x_0 + t eps for flows (the
    "sigmas" of SD3). ``timesteps[i]`` is what the network is given at step i.
    """

    timesteps: Any  # (N,)
    sigmas: Any  # (N + 1,)


def vp_grid(
    schedule: Schedule, steps: int, spacing: str = "leading", offset: int = 0, origin_steps: int = LCM_ORIGIN_STEPS
) -> VPGrid:
    """Integer timesteps of ``diffusion.schedules.timesteps`` (``lcm_timesteps`` for spacing ``lcm``, on a grid
    of ``origin_steps``), then one last step to alpha_bar = 1."""
    if spacing == "lcm":
        t = lcm_timesteps(schedule, steps, origin_steps)
    else:
        t = timesteps(schedule, steps, spacing, offset)
    return VPGrid(t.astype(np.float64), np.append(schedule.alpha_bar[t], 1.0))


# Where sigma-space samplers start by default: EDM's sigma_max (Karras et al. 2022, Sec. 5 and Table 1).
SIGMA_MAX = 80.0


def sigma_grid(
    schedule: Schedule, steps: int, spacing: str = "linspace", offset: int = 0, sigma_max: float | None = SIGMA_MAX
) -> SigmaGrid:
    """Sigmas for a sigma-space sampler, then a final 0 (k-diffusion's ``get_sigmas``).

    ``linspace`` takes sigma at N fractional timesteps evenly spaced from the
    top timestep down to 0 (not rounded); ``leading`` / ``trailing`` take the
    integer timesteps of those spacings; ``karras`` is Karras et al. 2022,
    eq. 5 between the schedule's smallest sigma and the top one. Sigma is
    interpolated in log space (``sigma_at``), so a zero-terminal-SNR schedule
    ends at a large but finite sigma.

    The top is the timestep of ``sigma_max`` (or T - 1 if the schedule stops
    below it). The cosine schedule reaches sigma ~ 4096 at T - 1, where the
    image is 1/4096 of x_t: starting there makes the first step of a few-step
    grid a leap of three orders of magnitude, which Heun's averaged slope and
    Karras's rho = 7 ramp (which then spends most steps up there) handle badly,
    while starting from sigma 80 loses nothing (x_0 is 1/80 of the noise).
    ``sigma_max=None`` starts at T - 1 whatever its sigma, as diffusers' and
    k-diffusion's discrete schedules do; ``leading`` and ``trailing`` always
    use the schedule's own integer timesteps.
    """
    T = schedule.num_timesteps
    top = T - 1.0
    if sigma_max is not None:
        if not sigma_max > 0:
            raise InputError(f"sigma_max must be > 0 (got {sigma_max}); None starts at the schedule's largest sigma")
        top = min(top, float(timestep_at(schedule, sigma_max)))
    if spacing == "karras":
        sigmas = karras_sigmas(steps, float(sigma_at(schedule, 0.0)), float(sigma_at(schedule, top)))
    else:
        t = np.linspace(top, 0, steps) if spacing == "linspace" else timesteps(schedule, steps, spacing, offset)
        sigmas = np.append(np.asarray(sigma_at(schedule, t), np.float64), 0.0)
    return SigmaGrid(np.asarray(timestep_at(schedule, sigmas[:-1]), np.float64), sigmas)


def flow_grid(steps: int, shift: float = 1.0) -> SigmaGrid:
    """Times t from 1 to 0 (``diffusion.schedules.flow_timesteps``, with the SD3 / Flux shift)."""
    t = flow_timesteps(steps, shift)
    return SigmaGrid(t[:-1], t)


def _last_steps(grid, k: int):
    """The grid of the last k steps: per-step arrays keep k entries, per-frame arrays k + 1."""
    n = len(grid.timesteps)
    return type(grid)(*(a[n - k :] for a in grid))


# --- Families: how the sampler's state relates to x_0, eps and the network -----------


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family of samplers steps in, and how it asks the network.

    ``model(denoiser, parameterization, schedule, cond, clip_x0)`` builds the view
    its steps call; ``scales(grid)`` gives, per frame, the (signal, noise) scales
    of the forward process x_t = signal x_0 + noise eps that the network sees;
    ``state_factor(grid)`` gives the factor from that x_t to the sampler's own
    state; ``levels(grid)`` the noise level reported per frame.
    """

    model: Callable
    scales: Callable
    state_factor: Callable
    levels: Callable


def _broadcast_time(t, x):
    return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])


def _vp_model(denoiser, parameterization, schedule, cond, clip_x0):
    """predict(x_t, t, alpha_bar) -> (x0_hat, eps_hat) for a DDPM-space x_t at timestep t.

    A clipped x0_hat comes with the eps that agrees with it (as in Dhariwal &
    Nichol's code), so that x_t = a x0_hat + s eps_hat still holds.
    """

    def predict(x, t, alpha_bar):
        a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
        x0, eps = forward.to_x0_eps(denoiser(x, _broadcast_time(t, x), cond), parameterization, x, a, s)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - a * x0) / s
        return x0, eps

    return predict


def _sigma_model(denoiser, parameterization, schedule, cond, clip_x0):
    """slope(x, sigma) -> (dx/dsigma, x0_hat) for x = x_t / sqrt(alpha_bar) = x_0 + sigma eps.

    The network sees x_t = x / sqrt(1 + sigma^2) at the fractional timestep of
    sigma (k-diffusion's wrapper of a discrete-time model).
    """

    def slope(x, sigma):
        a = 1.0 / jnp.sqrt(1.0 + sigma**2)
        x_t, t = x * a, timestep_at(schedule, sigma)
        x0, _ = forward.to_x0_eps(denoiser(x_t, _broadcast_time(t, x), cond), parameterization, x_t, a, sigma * a)
        x0 = jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0
        return (x - x0) / sigma, x0

    return slope


def _flow_model(denoiser, parameterization, schedule, cond, clip_x0):
    """slope(x, t) -> (velocity, x0_hat) on the path x_t = (1 - t) x_0 + t eps."""

    def slope(x, t):
        velocity = denoiser(x, _broadcast_time(t, x), cond)
        x0 = x - t * velocity
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            velocity = (x - x0) / t
        return velocity, x0

    return slope


def _vp_scales(grid):
    return np.sqrt(grid.alpha_bar), np.sqrt(1.0 - grid.alpha_bar)


def _vp_levels(grid):
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - grid.alpha_bar) / grid.alpha_bar)


def _sigma_scales(grid):
    signal = 1.0 / np.sqrt(1.0 + grid.sigmas**2)
    return signal, grid.sigmas * signal


def _flow_scales(grid):
    return 1.0 - grid.sigmas, grid.sigmas


def _sigma_state_factor(grid):
    return np.sqrt(1.0 + grid.sigmas**2)


def _ones(grid):
    return np.ones(len(grid.timesteps) + 1)


def _sigmas(grid):
    return grid.sigmas


FAMILIES = {
    "vp": Family(_vp_model, _vp_scales, _ones, _vp_levels),
    "sigma": Family(_sigma_model, _sigma_scales, _sigma_state_factor, _sigmas),
    "flow": Family(_flow_model, _flow_scales, _ones, _sigmas),
}


# --- The steps -----------------------------------------------------------------------
#
# Each step is step(model, grid, state, i, key, **options) -> (state, x0_hat): state is
# (x, history), history the previous predictions a multistep method keeps (None for
# one-step methods); key is this step's key, fold_in(key, i), or None; x0_hat is the
# step's first prediction of the data, for trajectories.


def _normal(key, x):
    return jax.random.normal(key, x.shape, x.dtype)


def ddpm_step(predict, grid, state, i, key, *, variance="fixed_small"):
    """Ancestral sampling from p(x_{t-1} | x_t) (Ho et al. 2020, Alg. 2, via eq. 6-7).

    The network's x0_hat goes into the posterior q(x_prev | x_t, x_0) of eq. 7
    (``forward.posterior_coefficients``). When steps skip timesteps, alpha =
    alpha_bar / alpha_bar_prev and beta = 1 - alpha are those of the whole jump.
    Variance ``fixed_small`` is the posterior's beta_tilde, ``fixed_large`` is
    beta (Ho et al. Sec. 3.2: both work). No noise is added at the last step.
    """
    x, _ = state
    alpha_bar, alpha_bar_prev = grid.alpha_bar[i], grid.alpha_bar[i + 1]
    x0, _ = predict(x, grid.timesteps[i], alpha_bar)
    coef_x0, coef_xt, beta_tilde = forward.posterior_coefficients(alpha_bar, alpha_bar_prev)
    var = 1.0 - alpha_bar / alpha_bar_prev if variance == "fixed_large" else beta_tilde
    std = jnp.where(i < len(grid.timesteps) - 1, jnp.sqrt(var), 0.0)
    return (coef_x0 * x0 + coef_xt * x + std * _normal(key, x), None), x0


def ddim_step(predict, grid, state, i, key, *, eta=0.0):
    """DDIM (Song, Meng, Ermon 2021, eq. 12, with sigma_t of eq. 16).

    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar_prev).
    eta = 0 is the deterministic DDIM (a first-order solver of the probability-flow
    ODE); eta = 1 is DDPM with the fixed_small variance.
    """
    x, _ = state
    alpha_bar, alpha_bar_prev = grid.alpha_bar[i], grid.alpha_bar[i + 1]
    x0, eps = predict(x, grid.timesteps[i], alpha_bar)
    x_prev = jnp.sqrt(alpha_bar_prev) * x0
    if eta == 0:
        return (x_prev + jnp.sqrt(1.0 - alpha_bar_prev) * eps, None), x0
    std = eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    x_prev += jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - std**2, 0.0)) * eps + std * _normal(key, x)
    return (x_prev, None), x0


def _ddim_transfer(x, eps, alpha_bar, alpha_bar_prev):
    """Move x_t to level alpha_bar_prev along eps: PNDM's transfer part phi (Liu et al. 2022), DDIM's eta = 0 step."""
    x0 = (x - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    return jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1.0 - alpha_bar_prev) * eps


# Adams-Bashforth weights on (eps_now, eps_1, eps_2, eps_3 steps ago), by how many earlier eps exist.
PLMS_COEFFICIENTS = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
)


def plms_step(predict, grid, state, i, key):
    """Pseudo linear multistep, PLMS (Liu et al. 2022, PNDM), as the common implementations run it.

    The transfer is DDIM's, with eps replaced by an Adams-Bashforth combination
    of the current and up to three earlier eps. The first step has no history:
    it averages the eps at both ends of a DDIM step (a Heun step, 2 network
    calls, the warm-up of the widely used "skip PRK steps" variant), then the
    order rises 2, 3, 4. NFE = N + 1 (N = 1: 1).
    """
    x, history = state
    alpha_bar, alpha_bar_prev = grid.alpha_bar[i], grid.alpha_bar[i + 1]
    x0, eps = predict(x, grid.timesteps[i], alpha_bar)

    def warm_up():
        x_prev = _ddim_transfer(x, eps, alpha_bar, alpha_bar_prev)
        _, eps_prev = predict(x_prev, grid.timesteps[i + 1], alpha_bar_prev)
        return (eps + eps_prev) / 2

    def multistep():
        c = jnp.asarray(PLMS_COEFFICIENTS, x.dtype)[jnp.minimum(i, 3)]
        return c[0] * eps + jnp.tensordot(c[1:], history, axes=1)

    eps_combined = lax.cond((i == 0) & (len(grid.timesteps) > 1), warm_up, multistep)
    history = jnp.concatenate([eps[None], history[:-1]])
    return (_ddim_transfer(x, eps_combined, alpha_bar, alpha_bar_prev), history), x0


def lcm_step(predict, grid, state, i, key):
    """LCM's multistep sampling (Luo et al. 2023, Alg. 3; Song et al. 2023, Alg. 1), as the LCMScheduler runs it.

    The consistency function maps x_t straight to an estimate of the trajectory's origin,
    denoised = c_skip(t) x_t + c_out(t) x0_hat (``forward.consistency_function``);
    every step but the last then noises it afresh to the next timestep,
    x_next = sqrt(alpha_bar_next) denoised + sqrt(1 - alpha_bar_next) z. The last
    step returns ``denoised``, so one step is a single network call and no noise.
    """
    x, _ = state
    t, alpha_bar_next = grid.timesteps[i], grid.alpha_bar[i + 1]
    x0, _ = predict(x, t, grid.alpha_bar[i])
    denoised = forward.consistency_function(x0, x, t)
    if len(grid.timesteps) == 1:
        return (denoised, None), denoised
    renoised = jnp.sqrt(alpha_bar_next) * denoised + jnp.sqrt(1.0 - alpha_bar_next) * _normal(key, x)
    return (jnp.where(i < len(grid.timesteps) - 1, renoised, denoised), None), denoised


def _churn(x, grid, i, key, churn):
    """Raise the noise level from sigma to sigma_hat = (1 + gamma) sigma (Karras et al. 2022, Alg. 2, lines 4-6).

    gamma = min(churn / N, sqrt(2) - 1), as in k-diffusion with S_tmin = 0,
    S_tmax = inf, S_noise = 1.
    """
    sigma = grid.sigmas[i]
    if churn == 0:
        return x, sigma
    sigma_hat = sigma * (1.0 + min(churn / len(grid.timesteps), math.sqrt(2.0) - 1.0))
    return x + jnp.sqrt(sigma_hat**2 - sigma**2) * _normal(key, x), sigma_hat


def euler_step(slope, grid, state, i, key, *, churn=0.0):
    """One Euler step of dx/dsigma = (x - x0_hat) / sigma (k-diffusion's ``sample_euler``).

    Karras et al. 2022, Alg. 1 without its second-order correction; churn > 0
    first adds the noise of their Alg. 2. With sigma = t and the velocity as
    slope, this is the flow-matching Euler sampler (Lipman et al. 2023; Liu et
    al. 2023).
    """
    x, _ = state
    x, sigma = _churn(x, grid, i, key, churn)
    d, x0 = slope(x, sigma)
    return (x + d * (grid.sigmas[i + 1] - sigma), None), x0


def _ancestral_split(sigma, sigma_next, eta):
    """sigma_down and sigma_up of an ancestral step from sigma to sigma_next (k-diffusion's ``get_ancestral_step``).

    sigma_down^2 + sigma_up^2 = sigma_next^2, and sigma_up^2 = eta^2 sigma_next^2
    (sigma^2 - sigma_next^2) / sigma^2: the noise of a DDPM step, in sigma space.
    """
    sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    # Clamped at 0: when sigma_up = sigma_next, rounding (a fused multiply-add) can leave a tiny negative.
    return jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def euler_ancestral_step(slope, grid, state, i, key, *, eta=1.0):
    """Euler "ancestral" (k-diffusion's ``sample_euler_ancestral``, the "Euler a" of image tools).

    Step deterministically down to sigma_down, then add fresh noise up to
    sigma_next (``_ancestral_split``): the noise of an ancestral (DDPM-like)
    step, in sigma space.
    """
    x, _ = state
    sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
    d, x0 = slope(x, sigma)
    sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
    x = x + d * (sigma_down - sigma)
    return (x + sigma_up * _normal(key, x) if eta > 0 else x, None), x0


def heun_step(slope, grid, state, i, key, *, churn=0.0):
    """Heun's second-order step (Karras et al. 2022, Alg. 1; with churn, Alg. 2).

    An Euler step, then the average of the slopes at both ends; the step to
    sigma = 0 stays Euler (the slope there is undefined), so NFE = 2N - 1.
    """
    x, _ = state
    x, sigma = _churn(x, grid, i, key, churn)
    sigma_next = grid.sigmas[i + 1]
    d, x0 = slope(x, sigma)
    x_euler = x + d * (sigma_next - sigma)

    def trapezoid():
        d_next, _ = slope(x_euler, sigma_next)
        return x + (d + d_next) / 2 * (sigma_next - sigma)

    return (lax.cond(sigma_next > 0, trapezoid, lambda: x_euler), None), x0


def _log_step(sigmas, i):
    """h = log(sigma_i / sigma_{i+1}), step i's length in lambda = -log sigma, r = h_{i-1} / h, and whether r exists.

    It does not on the first step (no step before it; sigmas[i - 1] wraps round
    to the final 0) nor on the last, to sigma = 0, where h is infinite: r is 1 there.
    """
    h = jnp.log(sigmas[i] / sigmas[i + 1])
    has_previous = (i > 0) & (sigmas[i + 1] > 0)
    return h, jnp.where(has_previous, jnp.log(sigmas[i - 1] / sigmas[i]) / h, 1.0), has_previous


def _dpmpp_2m_data(grid, i, x0, history):
    """h = lambda_next - lambda and D, x0_hat extrapolated linearly in lambda from the previous step (DPM-Solver++(2M)).

    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h; the first
    step, and the last (to sigma = 0), use D = x0_hat (first order, as the widely
    used implementations do).
    """
    h, r, second_order = _log_step(grid.sigmas, i)
    return h, jnp.where(second_order, x0 + (x0 - history[0]) / (2 * r), x0)


def dpmpp_2m_step(slope, grid, state, i, key):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), in sigma space as k-diffusion's ``sample_dpmpp_2m``.

    In lambda = -log sigma the update is exact for a constant x0_hat:
    x_next = (sigma_next / sigma) x - expm1(-h) D, with h and D of ``_dpmpp_2m_data``.
    """
    x, history = state
    sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
    _, x0 = slope(x, sigma)
    h, d = _dpmpp_2m_data(grid, i, x0, history)
    return ((sigma_next / sigma) * x - jnp.expm1(-h) * d, x0[None]), x0


def dpmpp_2m_sde_step(slope, grid, state, i, key, *, eta=1.0):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", its SDE solver), the "DPM++ 2M SDE" of image tools.

    The multistep of ``dpmpp_2m_step`` for the reverse SDE instead of the ODE:
    over a step of h in lambda = -log sigma, x is shrunk by (sigma_next / sigma)
    e^{-eta h} = e^{-(1 + eta) h}, moves the rest of the way to D, and gets fresh
    noise of standard deviation sigma_next sqrt(1 - e^{-2 eta h}). eta = 1 is the
    SDE (k-diffusion's ``sample_dpmpp_2m_sde`` with its midpoint correction,
    per-step Gaussian noise in place of its Brownian tree); eta = 0 is the ODE
    update of ``dpmpp_2m_step``.
    """
    x, history = state
    sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
    _, x0 = slope(x, sigma)
    h, d = _dpmpp_2m_data(grid, i, x0, history)
    x_next = jnp.exp(-(1.0 + eta) * h) * x - jnp.expm1(-(1.0 + eta) * h) * d
    if eta > 0:  # (at eta = 0 the noise's -2 eta h would be 0 * inf = nan on the last step)
        x_next = x_next + sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * _normal(key, x)
    return (x_next, x0[None]), x0


def _brownian_noise(key, x, sigma, sigma_mid, sigma_next):
    """Two standard normals with the joint law of k-diffusion's Brownian-tree noise within one step.

    n_1 and n_2 are the increments of one Brownian motion W(sigma) from sigma to
    sigma_mid and from sigma to sigma_next, each divided by its standard
    deviation: they share the first stretch, so their correlation is
    sqrt((sigma - sigma_mid) / (sigma - sigma_next)).
    """
    key_1, key_2 = jax.random.split(key)
    z_1, z_2 = _normal(key_1, x), _normal(key_2, x)
    first, second = sigma - sigma_mid, sigma_mid - sigma_next
    return z_1, (jnp.sqrt(first) * z_1 + jnp.sqrt(second) * z_2) / jnp.sqrt(first + second)


def dpmpp_sde_step(slope, grid, state, i, key, *, eta=1.0):
    """DPM++ SDE (k-diffusion's ``sample_dpmpp_sde``, r = 1/2): DPM-Solver++(2S) (Lu et al. 2022) with ancestral noise.

    Two calls a step. An ancestral half step (``_ancestral_split``, the data-prediction
    update x' = (sigma_down / sigma) x + (1 - sigma_down / sigma) D, then noise
    sigma_up) from sigma to the midpoint in lambda = -log sigma,
    sigma_mid = sqrt(sigma sigma_next), gives x0_hat_mid there; a whole ancestral
    step from x to sigma_next then uses D = x0_hat_mid. The two noises are those
    of one Brownian path (``_brownian_noise``; k-diffusion draws them from a
    Brownian tree). eta = 0 is the deterministic DPM-Solver++(2S), second order.
    The last step, to sigma = 0, returns x0_hat (one call).
    """
    x, _ = state
    sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
    _, x0 = slope(x, sigma)

    def two_stages():
        sigma_mid = jnp.sqrt(sigma * sigma_next)
        noise_mid, noise = _brownian_noise(key, x, sigma, sigma_mid, sigma_next) if eta > 0 else (0.0, 0.0)
        down, up = _ancestral_split(sigma, sigma_mid, eta)
        _, x0_mid = slope((down / sigma) * x + (1.0 - down / sigma) * x0 + up * noise_mid, sigma_mid)
        down, up = _ancestral_split(sigma, sigma_next, eta)
        return (down / sigma) * x + (1.0 - down / sigma) * x0_mid + up * noise

    return (lax.cond(sigma_next > 0, two_stages, lambda: x0), None), x0


def _unipc_coefficients(h, variant):
    """B(h) and the right-hand sides b_1, b_2 of UniPC's order conditions, data prediction (Zhao et al. 2023, Thm. 3.1).

    In the data-prediction form the exponent is hh = -h: b_k = k! hh phi_{k+1}(hh) / B(h)
    with phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z, and B(h) = e^hh - 1
    ("bh2") or hh ("bh1"). Both tend to 1/2 and 1/3 as h -> 0.
    """
    hh = -h
    b = jnp.expm1(hh) if variant == "bh2" else hh
    g_1 = jnp.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    g_2 = g_1 / hh - 0.5  # hh phi_3(hh)
    return b, g_1 / b, 2.0 * g_2 / b


def unipc_step(slope, grid, state, i, key, *, variant="bh2"):
    """UniPC (Zhao et al. 2023, "UniPC"), order 2 in data prediction, as the widely used implementations run it.

    A multistep predictor-corrector in lambda = -log sigma at one network call per
    step. The call at the x_i the predictor reached gives x0_hat_i, which first
    *corrects* x_i (UniC: the order conditions of ``_unipc_coefficients`` solved
    with the new x0_hat_i as one more point), then *predicts* x_{i+1} from the
    corrected x_i (UniP-2). With B(h) = e^hh - 1 ("bh2", diffusers' default) the
    predictor is DPM-Solver++(2M); "bh1" (B(h) = hh) is the official code's
    default. The corrector raises the order by one: 3 for the whole run. As the
    common implementations do, a single difference gets the weight 1/2 instead
    of b_1 (UniC-1 on the second step, UniP-2's predictor); the first step and
    the last (to sigma = 0) predict at first order, and x_0 after the last step
    is x0_hat there. The correction is applied as an increment to the x the step
    is given, so an edit (inpainting) that changed x keeps its change. State:
    (x_i as predicted, (x0_hat_{i-1}, x0_hat_{i-2})).
    """
    x, history = state
    sigmas = grid.sigmas
    _, x0 = slope(x, sigmas[i])
    x0_prev, x0_prev2 = history[0], history[1]

    # UniC: correct the step i - 1 -> i now that x0_hat_i is known (none at i = 0, where step 0's numbers stand in).
    h, r, _ = _log_step(sigmas, jnp.maximum(i - 1, 0))
    b, b_1, b_2 = _unipc_coefficients(h, variant)
    rho_0 = (b_1 - b_2) / (1.0 + r)  # the 2 x 2 system rho_0 (-r)^(k-1) + rho_1 = b_k, k = 1, 2
    d_1 = (x0_prev - x0_prev2) / r
    second = rho_0 * d_1 + (b_1 - rho_0) * (x0 - x0_prev) - d_1 / 2  # minus the predictor's own term
    correction = jnp.where(i >= 2, second, (x0 - x0_prev) / 2)
    x = jnp.where(i >= 1, x - b * correction, x)

    # UniP-2: predict x_{i+1} from the corrected x_i.
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    h, r, second_order = _log_step(sigmas, i)
    b, _, _ = _unipc_coefficients(h, variant)
    extrapolation = jnp.where(second_order, b * (x0 - x0_prev) / (2 * r), 0.0)
    x_next = (sigma_next / sigma) * x - jnp.expm1(-h) * x0 - extrapolation
    return (x_next, jnp.stack([x0, x0_prev])), x0


# --- The registry ----------------------------------------------------------------------


def _one_call_per_step(grid):
    return np.ones(len(grid.timesteps), np.int64)


def _two_calls_but_the_last(grid):
    return 1 + (np.asarray(grid.sigmas[1:]) > 0).astype(np.int64)


def _plms_calls(grid):
    calls = _one_call_per_step(grid)
    calls[:1] += len(calls) > 1  # the warm-up step calls twice (unless it is the only step)
    return calls


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registry entry: the step, its family, default spacing, options and their defaults.

    ``history`` is how many earlier predictions the step keeps; ``calls(grid)``
    the network calls of each step; ``stochastic(options)`` whether it draws noise.
    """

    step: Callable
    family: str
    spacing: str | None
    options: tuple = ()
    history: int = 0
    calls: Callable = _one_call_per_step
    stochastic: Callable = lambda options: False


def _positive(option):
    return lambda options: options[option] > 0


def _always(options):
    return True


SAMPLERS = {
    "ddpm": Sampler(
        ddpm_step, family="vp", spacing="leading", options=(("variance", "fixed_small"),), stochastic=_always
    ),
    "ddim": Sampler(ddim_step, family="vp", spacing="leading", options=(("eta", 0.0),), stochastic=_positive("eta")),
    "plms": Sampler(plms_step, family="vp", spacing="leading", history=3, calls=_plms_calls),
    "lcm": Sampler(lcm_step, family="vp", spacing="lcm", stochastic=_always),
    "euler": Sampler(
        euler_step, family="sigma", spacing="linspace", options=(("churn", 0.0),), stochastic=_positive("churn")
    ),
    "euler_a": Sampler(
        euler_ancestral_step, family="sigma", spacing="linspace", options=(("eta", 1.0),), stochastic=_positive("eta")
    ),
    "heun": Sampler(
        heun_step, family="sigma", spacing="linspace", options=(("churn", 0.0),), calls=_two_calls_but_the_last,
        stochastic=_positive("churn"),
    ),
    "dpmpp_2m": Sampler(dpmpp_2m_step, family="sigma", spacing="linspace", history=1),
    "dpmpp_2m_karras": Sampler(dpmpp_2m_step, family="sigma", spacing="karras", history=1),
    "unipc": Sampler(
        unipc_step, family="sigma", spacing="linspace", options=(("variant", "bh2"),), history=2,
    ),
    "dpmpp_sde": Sampler(
        dpmpp_sde_step, family="sigma", spacing="linspace", options=(("eta", 1.0),), calls=_two_calls_but_the_last,
        stochastic=_positive("eta"),
    ),
    "dpmpp_sde_karras": Sampler(
        dpmpp_sde_step, family="sigma", spacing="karras", options=(("eta", 1.0),), calls=_two_calls_but_the_last,
        stochastic=_positive("eta"),
    ),
    "dpmpp_2m_sde": Sampler(
        dpmpp_2m_sde_step, family="sigma", spacing="linspace", options=(("eta", 1.0),), history=1,
        stochastic=_positive("eta"),
    ),
    "dpmpp_2m_sde_karras": Sampler(
        dpmpp_2m_sde_step, family="sigma", spacing="karras", options=(("eta", 1.0),), history=1,
        stochastic=_positive("eta"),
    ),
    "flow_euler": Sampler(euler_step, family="flow", spacing=None),
    "flow_heun": Sampler(heun_step, family="flow", spacing=None, calls=_two_calls_but_the_last),
}

VARIANCES = ("fixed_small", "fixed_large")
UNIPC_VARIANTS = ("bh1", "bh2")


# --- Plans: everything about a run that is settled before compiling -------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A validated sampling run, without the data: sampler, grid (NumPy, float64) and settings."""

    sampler: Sampler
    grid: VPGrid | SigmaGrid
    parameterization: str
    schedule: Schedule | None = None
    options: tuple = ()
    clip_x0: bool = False

    @property
    def family(self) -> Family:
        return FAMILIES[self.sampler.family]

    @property
    def steps(self) -> int:
        return len(self.grid.timesteps)

    @property
    def nfe(self) -> int:
        """Network evaluations of the whole run."""
        return int(np.sum(self.sampler.calls(self.grid)))

    def last_steps(self, k: int) -> Plan:
        """The same run restricted to its last k steps (SDEdit's partial sampling)."""
        return dataclasses.replace(self, grid=_last_steps(self.grid, k))


def make_plan(
    sampler: str,
    *,
    schedule: Schedule | None,
    steps: int,
    parameterization: str,
    spacing: str | None = None,
    offset: int = 0,
    shift: float | None = None,
    sigma_max: float | None = SIGMA_MAX,
    clip_x0: bool = False,
    origin_steps: int | None = None,
    **options,
) -> Plan:
    """Check every setting on the host and lay out the grid; raises InputError saying what to change.

    ``sigma_max`` is where the sigma-space samplers start (``sigma_grid``;
    None: at the schedule's largest sigma); the other families ignore it.
    ``origin_steps``: the grid the ``lcm`` sampler picks its timesteps from
    (default ``LCM_ORIGIN_STEPS``; the one the model was distilled on).
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    _check_parameterization(sampler, spec.family, parameterization)
    _check_steps(steps, schedule, spec.family, sampler)
    known = dict(spec.options)
    unknown = set(options) - set(known)
    if unknown:
        offered = ", ".join(known) or "none"
        raise InputError(f"sampler {sampler!r} has no option {', '.join(sorted(unknown))}; its options: {offered}")
    options = {**known, **options}
    _check_options(sampler, options)
    if spec.family == "flow":
        if schedule is not None or spacing is not None or offset:
            raise InputError(f"{sampler} runs time t from 1 to 0: pass no schedule, spacing or offset (use shift)")
        grid = flow_grid(steps, 1.0 if shift is None else shift)
    else:
        if shift is not None:
            raise InputError(f"shift applies to the flow samplers only, not {sampler!r}")
        spacing = spec.spacing if spacing is None else spacing
        if spec.spacing == "lcm":
            allowed = ("lcm",)
        else:
            allowed = ("linspace", "leading", "trailing") + (("karras",) if spec.family == "sigma" else ())
        if spacing not in allowed:
            raise InputError(f"{sampler} takes spacing {', '.join(allowed)} (got {spacing!r})")
        if offset and spacing != "leading":
            raise InputError("offset applies only to 'leading' spacing")
        if origin_steps is not None and spacing != "lcm":
            raise InputError(f"origin_steps applies to the lcm sampler only, not {sampler!r}")
        if spec.family == "vp":
            grid = vp_grid(schedule, steps, spacing, offset, origin_steps or LCM_ORIGIN_STEPS)
        else:
            grid = sigma_grid(schedule, steps, spacing, offset, sigma_max)
        _check_terminal_snr(sampler, grid, parameterization)
    return Plan(spec, grid, parameterization, schedule, tuple(sorted(options.items())), bool(clip_x0))


def _check_parameterization(sampler, family, parameterization):
    if parameterization not in forward.PARAMETERIZATIONS:
        raise InputError(
            f"unknown parameterization {parameterization!r}; choose one of {', '.join(forward.PARAMETERIZATIONS)}"
        )
    if (family == "flow") != (parameterization == "velocity"):
        need = "'velocity'" if family == "flow" else "eps, x0, v or score"
        raise InputError(f"sampler {sampler!r} needs a denoiser predicting {need} (got {parameterization!r})")


def _check_steps(steps, schedule, family, sampler):
    check_whole("steps", steps, 1)
    if family == "flow":
        return
    if not isinstance(schedule, Schedule):
        raise InputError(f"sampler {sampler!r} needs the schedule the denoiser was trained with (got {schedule!r})")
    if steps > schedule.num_timesteps:
        raise InputError(f"steps must be at most the schedule's {schedule.num_timesteps} timesteps (got {steps})")


def _check_options(sampler, options):
    if "eta" in options and not 0.0 <= options["eta"] <= 1.0:
        raise InputError(f"{sampler}: eta must be in [0, 1] (got {options['eta']})")
    if "churn" in options and not options["churn"] >= 0.0:
        raise InputError(f"{sampler}: churn must be >= 0 (got {options['churn']}); 0 means deterministic")
    if "variance" in options and options["variance"] not in VARIANCES:
        raise InputError(f"{sampler}: variance must be one of {', '.join(VARIANCES)} (got {options['variance']!r})")
    if "variant" in options and options["variant"] not in UNIPC_VARIANTS:
        raise InputError(f"{sampler}: variant must be one of {', '.join(UNIPC_VARIANTS)} (got {options['variant']!r})")


def _check_terminal_snr(sampler, grid, parameterization):
    """DDPM-space steps divide by sqrt(alpha_bar) where eps gives x_0: impossible where alpha_bar = 0."""
    if not isinstance(grid, VPGrid) or grid.alpha_bar[0] > 0:
        return
    if sampler == "plms":
        raise InputError("plms extrapolates eps, so it cannot start where alpha_bar = 0 (zero terminal SNR); use ddim")
    if parameterization in ("eps", "score"):
        raise InputError(
            "the first timestep has alpha_bar = 0 (zero terminal SNR), where an eps-prediction says nothing about x_0; "
            "use a v- or x0-prediction model, or a spacing that does not start at the last timestep"
        )


# --- Running a plan ----------------------------------------------------------------------


class Result(NamedTuple):
    """What a sampler returns.

    ``x``: the sample. ``nfe``: network evaluations (a guided call counts once).
    With ``return_trajectory``: ``xs`` (N + 1, B, ...) the x_t the network sees at
    every frame, from the start to ``x`` (``xs[-1]`` is ``x``, bit for bit);
    ``x0s`` (N, B, ...) each step's first prediction of x_0. ``timesteps`` (N,)
    the network time of each step; ``sigmas`` (N + 1,) the noise level of each
    frame (sigma, or t for flows).
    """

    x: jax.Array
    nfe: int
    xs: jax.Array | None = None
    x0s: jax.Array | None = None
    timesteps: np.ndarray | None = None
    sigmas: np.ndarray | None = None


class Edit(NamedTuple):
    """A change to every step (inpainting): ``wrap(step, args) -> step``, ``wrap`` hashable, ``args`` arrays."""

    wrap: Callable
    args: Any


class _Static(NamedTuple):
    sampler: Sampler
    parameterization: str
    schedule: Schedule | None
    options: tuple
    clip_x0: bool
    denoiser: tuple
    wrap: Callable | None
    trajectory: bool


class _Dynamic(NamedTuple):
    denoiser: list
    grid: Any
    state_factor: jax.Array
    cond: Any
    key: Any
    edit_args: Any


def _split_denoiser(denoiser):
    """The arrays of the denoiser's pytree (an NNX module's weights) become arguments; the rest, constants."""
    leaves, treedef = jax.tree_util.tree_flatten(denoiser)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    arrays = [leaf if a else None for leaf, a in zip(leaves, is_array)]
    others = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, others)


def _join_denoiser(arrays, static):
    treedef, others = static
    return jax.tree_util.tree_unflatten(treedef, [a if o is None else o for a, o in zip(arrays, others)])


def _body(static: _Static, dyn: _Dynamic):
    """The scan body: (state, i) -> (state, frame), frame = (x_t, x0_hat) or None."""
    denoiser = _join_denoiser(dyn.denoiser, static.denoiser)

    def body(state, i):
        # Guidance in an interval is decided by the step's time, for all of the step's network calls.
        step_denoiser = denoiser.at_step(dyn.grid.timesteps[i]) if isinstance(denoiser, Guided) else denoiser
        model = FAMILIES[static.sampler.family].model(
            step_denoiser, static.parameterization, static.schedule, dyn.cond, static.clip_x0
        )
        step = functools.partial(static.sampler.step, model, dyn.grid, **dict(static.options))
        if static.wrap is not None:
            step = static.wrap(step, dyn.edit_args)
        key = None if dyn.key is None else jax.random.fold_in(dyn.key, i)
        state, x0 = step(state, i, key)
        return state, ((state[0] / dyn.state_factor[i + 1], x0) if static.trajectory else None)

    return body


def _initial_state(static, dyn, x_start):
    history = static.sampler.history
    memory = jnp.zeros((history,) + x_start.shape, x_start.dtype) if history else None
    return x_start * dyn.state_factor[0], memory


@functools.partial(jax.jit, static_argnames="static")
def _scan(static: _Static, dyn: _Dynamic, x_start):
    steps = jnp.arange(len(dyn.grid.timesteps))
    state, frames = lax.scan(_body(static, dyn), _initial_state(static, dyn, x_start), steps)
    return state[0] / dyn.state_factor[-1], frames


@functools.partial(jax.jit, static_argnames="static")
def _one_step(static: _Static, dyn: _Dynamic, state, i):
    return _body(static, dyn)(state, i)


def _python_loop(static, dyn, x_start):
    state, frames = _initial_state(static, dyn, x_start), []
    for i in range(len(dyn.grid.timesteps)):
        state, frame = _one_step(static, dyn, state, jnp.int32(i))
        frames.append(frame)
    stacked = jax.tree.map(lambda *f: jnp.stack(f), *frames) if static.trajectory else None
    return state[0] / dyn.state_factor[-1], stacked


def run(
    plan: Plan,
    denoiser,
    x_start,
    *,
    key=None,
    cond=None,
    return_trajectory: bool = False,
    python_loop: bool = False,
    edit: Edit | None = None,
) -> Result:
    """Run a plan from x_start, the x_t of its first frame (pure noise for ordinary sampling).

    Compiled once per static setting (sampler, options, parameterization,
    schedule, trajectory, the denoiser's non-array parts; jit also keys on
    shapes and dtypes): the denoiser's arrays -- an NNX module's weights, a
    ``jax.tree_util.Partial``'s arguments -- are arguments of the program, so a
    model trained further is sampled with its new weights without recompiling.
    Arrays captured in a closure are constants baked in at first compile:
    pass the model itself (or a Partial) rather than a lambda around it. A
    ``guidance.Guided`` denoiser with an interval is guided step by step
    (``Guided.at_step``).
    """
    x_start, cond = _check_inputs(plan, denoiser, x_start, key, cond)
    levels = plan.family.levels(plan.grid)
    if plan.steps == 0:  # nothing to run (img2img at strength 0)
        empty = (x_start[None], jnp.zeros((0,) + x_start.shape, x_start.dtype)) if return_trajectory else ()
        return Result(x_start, 0, *empty, np.asarray(plan.grid.timesteps), levels)
    arrays, denoiser_static = _split_denoiser(denoiser)
    wrap = None if edit is None else edit.wrap
    static = _Static(
        plan.sampler, plan.parameterization, plan.schedule, plan.options, plan.clip_x0, denoiser_static, wrap,
        bool(return_trajectory),
    )
    try:
        hash(static)
    except TypeError as error:
        raise InputError(f"the denoiser holds a value that is neither an array nor hashable: {error}") from None
    as_x = lambda a: jnp.asarray(a, x_start.dtype)  # noqa: E731
    grid, state_factor = jax.tree.map(as_x, plan.grid), as_x(plan.family.state_factor(plan.grid))
    dyn = _Dynamic(arrays, grid, state_factor, cond, key, None if edit is None else edit.args)
    x, frames = (_python_loop if python_loop else _scan)(static, dyn, x_start)
    xs, x0s = (None, None) if frames is None else (jnp.concatenate([x_start[None], frames[0]]), frames[1])
    return Result(x, plan.nfe, xs, x0s, np.asarray(plan.grid.timesteps), levels)


def _check_inputs(plan, denoiser, x_start, key, cond):
    if not callable(denoiser):
        raise InputError(f"the denoiser must be a function (x, t, cond) -> prediction (got {type(denoiser).__name__})")
    x_start = jnp.asarray(x_start)
    if x_start.ndim < 1 or not jnp.issubdtype(x_start.dtype, jnp.floating):
        raise InputError(
            f"x_start (sample's x_T) must be a float array of shape (batch, ...) (got {x_start.dtype} {x_start.shape})"
        )
    if cond is not None:
        cond = jax.tree.map(jnp.asarray, cond)
        for leaf in jax.tree.leaves(cond):
            if leaf.shape[:1] != x_start.shape[:1]:
                raise InputError(f"cond needs one entry per example: ({x_start.shape[0]}, ...) (got {leaf.shape})")
    if key is None and plan.sampler.stochastic(dict(plan.options)):
        raise InputError("this sampler draws noise at every step: pass key=jax.random.key(seed)")
    return x_start, cond


def sample(
    denoiser,
    x_T,
    *,
    sampler: str,
    schedule: Schedule | None = None,
    steps: int,
    parameterization: str,
    key=None,
    cond=None,
    spacing: str | None = None,
    offset: int = 0,
    shift: float | None = None,
    clip_x0: bool = False,
    origin_steps: int | None = None,
    return_trajectory: bool = False,
    python_loop: bool = False,
    **options,
) -> Result:
    """Draw samples: run ``sampler`` for ``steps`` steps from the noise x_T.

    denoiser: ``(x, t, cond) -> prediction`` in ``parameterization``; x_T: the
    noise, shape (B, ...), standard normal (the sampler scales it to its own
    variable: sigma-space samplers start at x_T sqrt(1 + sigma_max^2)); key:
    needed by stochastic samplers, step i uses ``fold_in(key, i)``; cond: one
    condition per example, passed to the denoiser. spacing (default: the
    sampler's), offset (``leading`` only), shift (flows), ``sigma_max`` (where
    sigma-space samplers start, ``sigma_grid``), clip_x0 (clip x0_hat to
    [-1, 1], off by default), origin_steps (``lcm`` only) and the sampler's options (``eta`` for ddim and
    euler_a, ``churn`` for euler and heun, ``variance`` for ddpm) shape the run;
    python_loop runs the same step in a Python loop, for debugging.
    """
    plan = make_plan(
        sampler, schedule=schedule, steps=steps, parameterization=parameterization, spacing=spacing, offset=offset,
        shift=shift, clip_x0=clip_x0, origin_steps=origin_steps, **options,
    )
    return run(plan, denoiser, x_T, key=key, cond=cond, return_trajectory=return_trajectory, python_loop=python_loop)
