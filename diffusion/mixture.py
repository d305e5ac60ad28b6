"""Gaussian mixtures and their exact denoiser: the perfect "network" for testing samplers.

If the data are a mixture of isotropic Gaussians,

    p(x_0) = sum_k w_k N(x_0; mu_k, std_k^2 I),

then a noised sample x_t = a x_0 + s eps (a = signal scale, s = noise scale,
see ``diffusion.forward``) is again such a mixture:

    p(x_t) = sum_k w_k N(x_t; a mu_k, (a^2 std_k^2 + s^2) I).

Given x_t, each component's posterior over x_0 is Gaussian (conjugacy), so the
best possible denoiser -- the posterior mean E[x_0 | x_t], which is what a
network trained with the squared error converges to -- is in closed form:

    E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + a std_k^2 / (a^2 std_k^2 + s^2) (x_t - a mu_k)),

with r_k(x_t) the posterior probability of component k. Tweedie's formula links
it to the score: E[x_0 | x_t] = (x_t + s^2 grad log p(x_t)) / a.

A sampler driven by ``exact_denoiser`` has no model error at all, so what is
left is the sampler's own discretisation error: tests and notebooks use this to
measure it.

Components may carry class labels; a condition c then restricts the mixture to
class c's components (the null label ``num_classes`` keeps them all), which is
what classifier-free guidance needs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import forward
from diffusion.errors import InputError
from diffusion.schedules import Schedule, alpha_bar_from_sigma, sigma_at


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Weights (K,), means (K, D), isotropic standard deviations (K,), class of each component (K,).

    A pytree, so it can be passed through ``jax.jit``; ``num_classes`` is static.
    """

    weights: jax.Array
    means: jax.Array
    stds: jax.Array
    classes: jax.Array
    num_classes: int = dataclasses.field(metadata=dict(static=True))

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def make_mixture(weights, means, stds, classes=None) -> GaussianMixture:
    """Build a mixture, checking shapes and values; ``classes`` defaults to one class for all."""
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    stds = np.broadcast_to(np.asarray(stds, np.float64), weights.shape)
    classes = np.zeros(len(weights), np.int32) if classes is None else np.asarray(classes, np.int32)
    if means.ndim != 2 or means.shape[0] != weights.shape[0] or classes.shape != weights.shape:
        raise InputError(
            f"need weights (K,), means (K, D), classes (K,); got {weights.shape}, {means.shape}, {classes.shape}"
        )
    if np.any(weights <= 0) or np.any(stds <= 0):
        raise InputError("mixture weights and standard deviations must be positive")
    return GaussianMixture(
        weights=jnp.asarray(weights / weights.sum(), jnp.float32),
        means=jnp.asarray(means, jnp.float32),
        stds=jnp.asarray(stds, jnp.float32),
        classes=jnp.asarray(classes),
        num_classes=int(classes.max()) + 1,
    )


def ring_mixture(num_modes: int = 8, radius: float = 2.0, std: float = 0.15, num_classes: int = 2) -> GaussianMixture:
    """Equal-weight 2-D Gaussians on a circle, labelled 0, 1, 0, 1, ... (the "8 Gaussians" toy)."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return make_mixture(np.ones(num_modes), means, std, np.arange(num_modes) % num_classes)


def random_mixture(seed: int, num_components: int, dim: int, std_range=(0.1, 0.4)) -> GaussianMixture:
    """A reproducible mixture in ``dim`` dimensions with means in [-1, 1] and known parameters."""
    rng = np.random.default_rng(seed)
    return make_mixture(
        rng.uniform(0.5, 1.5, num_components),
        rng.uniform(-1.0, 1.0, (num_components, dim)),
        rng.uniform(*std_range, num_components),
    )


def sample(mixture: GaussianMixture, key, n: int):
    """Draw n samples; returns (x of shape (n, D), the component of each)."""
    key_component, key_noise = jax.random.split(key)
    component = jax.random.categorical(key_component, jnp.log(mixture.weights), shape=(n,))
    noise = jax.random.normal(key_noise, (n, mixture.dim))
    return mixture.means[component] + mixture.stds[component, None] * noise, component


def _log_weights(mixture: GaussianMixture, cond):
    """log w_k, restricted to class ``cond``'s components where cond is a real class; shape (B, K) or (K,)."""
    log_w = jnp.log(mixture.weights)
    if cond is None:
        return log_w
    cond = jnp.asarray(cond)[..., None]
    keep = (mixture.classes == cond) | (cond >= mixture.num_classes)
    return jnp.where(keep, log_w, -jnp.inf)


def _noised_variances(mixture: GaussianMixture, signal_scale, noise_scale):
    """a^2 std_k^2 + s^2, each component's variance after noising: shape (B or 1, K)."""
    return jnp.reshape(signal_scale, (-1, 1)) ** 2 * mixture.stds**2 + jnp.reshape(noise_scale, (-1, 1)) ** 2


def _component_log_densities(mixture: GaussianMixture, x, signal_scale, noise_scale):
    """log N(x; a mu_k, (a^2 std_k^2 + s^2) I) for every component: shape (B, K)."""
    a = jnp.reshape(signal_scale, (-1, 1))
    variance = _noised_variances(mixture, signal_scale, noise_scale)
    sq_dist = jnp.sum((x[:, None, :] - a[..., None] * mixture.means) ** 2, axis=-1)  # (B, K)
    log_norm = -0.5 * mixture.dim * jnp.log(2 * math.pi * variance)
    return log_norm - 0.5 * sq_dist / variance


def log_density(mixture: GaussianMixture, x, signal_scale=1.0, noise_scale=0.0, cond=None):
    """log p(x_t) of the noised mixture at x (shape (B, D)); scales are scalars or (B,)."""
    log_comp = _component_log_densities(mixture, x, signal_scale, noise_scale)
    return jax.nn.logsumexp(_log_weights(mixture, cond) + log_comp, axis=-1)


def component_posterior(mixture: GaussianMixture, x, signal_scale=1.0, noise_scale=0.0, cond=None):
    """r_k(x_t): the posterior probability that x_t (shape (B, D)) came from component k, shape (B, K)."""
    log_comp = _component_log_densities(mixture, x, signal_scale, noise_scale)
    return jax.nn.softmax(_log_weights(mixture, cond) + log_comp, axis=-1)


def posterior_mean(mixture: GaussianMixture, x, signal_scale, noise_scale, cond=None):
    """E[x_0 | x_t = x]: the optimal denoiser, in closed form (see the module docstring)."""
    responsibility = component_posterior(mixture, x, signal_scale, noise_scale, cond)  # (B, K)
    a = jnp.reshape(signal_scale, (-1, 1, 1))
    gain = (a[..., 0] * mixture.stds**2 / _noised_variances(mixture, signal_scale, noise_scale))[..., None]  # (B, K, 1)
    x0_given_k = mixture.means + gain * (x[:, None, :] - a * mixture.means)  # (B, K, D)
    return jnp.sum(responsibility[..., None] * x0_given_k, axis=1)


def score(mixture: GaussianMixture, x, signal_scale, noise_scale, cond=None):
    """grad_x log p(x_t) at x, by Tweedie's formula from the posterior mean."""
    a = forward.expand_to(jnp.asarray(signal_scale), x)
    s = forward.expand_to(jnp.asarray(noise_scale), x)
    return (a * posterior_mean(mixture, x, signal_scale, noise_scale, cond) - x) / s**2


def exact_denoiser(mixture: GaussianMixture, schedule: Schedule, parameterization: str = "eps"):
    """The optimal model of a DDPM-style diffusion, as a function ``(x, t, cond) -> prediction``.

    ``t`` is a (possibly fractional) timestep of ``schedule``; fractional t uses
    the same log-sigma interpolation as ``diffusion.schedules.sigma_at``, so this
    behaves exactly like a network trained on integer timesteps and called by a
    sigma-space sampler. The prediction is in the requested parameterization.
    """
    forward._check_kind(parameterization)

    def denoiser(x, t, cond=None):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        alpha_bar = alpha_bar_from_sigma(sigma_at(schedule, t))
        a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
        x0 = posterior_mean(mixture, x, a, s, cond)
        a, s = forward.expand_to(a, x), forward.expand_to(s, x)
        return forward.from_x0_eps(x0, (x - a * x0) / s, parameterization, a, s)

    return denoiser


def ode_origin(mixture: GaussianMixture, schedule: Schedule, x, t, steps: int = 400):
    """Where the probability-flow ODE trajectory through x at integer timestep t ends (t one per example, or
    one for all): the exact consistency function f(x_t, t) of Song et al. 2023, Sec. 3.

    In the variance-exploding variable y = x / sqrt(alpha_bar) the ODE is dy / d log sigma = y - D(y, sigma)
    (Karras et al. 2022, eq. 4, with D the posterior mean); classic RK4 with ``steps`` steps in log sigma takes
    it from sigma_t to the schedule's smallest sigma, and the last jump is to D there, as every sampler's final
    step is. Unconditional (all components).
    """
    sigmas = jnp.asarray(schedule.sigmas, x.dtype)
    sigma_min = sigmas[0]
    t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])

    def denoised(y, sigma):
        a = 1.0 / jnp.sqrt(1.0 + sigma**2)
        return posterior_mean(mixture, y * a[:, None], a, sigma * a)

    def slope(y, u):
        return y - denoised(y, jnp.exp(u))

    start = jnp.log(sigmas[t])
    h = (jnp.log(sigma_min) - start) / steps

    def rk4(n, y):
        u = start + n * h
        k1 = slope(y, u)
        k2 = slope(y + (h / 2)[:, None] * k1, u + h / 2)
        k3 = slope(y + (h / 2)[:, None] * k2, u + h / 2)
        k4 = slope(y + h[:, None] * k3, u + h)
        return y + (h / 6)[:, None] * (k1 + 2 * k2 + 2 * k3 + k4)

    alpha_bar = jnp.asarray(schedule.alpha_bar, x.dtype)[t]
    y = jax.lax.fori_loop(0, steps, rk4, x / jnp.sqrt(alpha_bar)[:, None])
    return denoised(y, jnp.full(x.shape[:1], sigma_min))


def exact_consistency_model(mixture: GaussianMixture, schedule: Schedule):
    """A perfect consistency-distilled model, as an x0-prediction ``(x, t, cond) -> x0_hat`` on integer
    timesteps: the x0_hat that ``forward.consistency_function`` turns into ``ode_origin`` exactly (where
    c_out(t) > 0), what a student trained to perfection on this mixture would predict."""

    def denoiser(x, t, cond=None):
        t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
        c_skip, c_out = forward.boundary_scalings(t)
        origin = ode_origin(mixture, schedule, x, jnp.round(t).astype(jnp.int32))
        return (origin - c_skip[:, None] * x) / c_out[:, None]

    return denoiser


def exact_flow_velocity(mixture: GaussianMixture):
    """The optimal rectified-flow model, ``(x, t, cond) -> velocity`` for t in (0, 1].

    On the path x_t = (1 - t) x_0 + t eps the best velocity estimate is
    E[eps - x_0 | x_t] = (x_t - E[x_0 | x_t]) / t.
    """

    def velocity(x, t, cond=None):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        x0 = posterior_mean(mixture, x, 1.0 - t, t, cond)
        return (x - x0) / forward.expand_to(t, x)

    return velocity
