"""Training objectives: what the network is asked to predict, and how errors are weighted.

Each objective takes a batch of clean data x_0, draws a noise level and the
noise itself, builds the noisy input, asks ``model(x_t, t, cond)`` for a
prediction and returns the mean squared error to the right target.

- ``denoising_loss``: the DDPM objectives on a ``Schedule``. The target is eps
  (Ho et al. 2020, eq. 14, their "L_simple"), x_0, or v = a eps - s x_0
  (Salimans & Ho 2022, Sec. 4); every one is computed from (x_0, eps) by
  ``forward.from_x0_eps``, so they cannot drift apart.
- ``min_snr_weight``: the optional Min-SNR-gamma weighting (Hang et al. 2023).
- ``flow_matching_loss``: conditional flow matching on the rectified-flow path
  (Lipman et al. 2023; Liu et al. 2023) with logit-normal times (Esser et al.
  2024).

Both losses are called as ``loss(model, x0, cond, key, **settings)`` and
return a scalar; they are pure functions of their inputs and the PRNG key, so
``jax.jit`` and ``jax.grad`` apply directly. ``model`` is any function
``(x, t, cond) -> prediction``, e.g. a U-Net with its dropout key bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion import forward
from diffusion.errors import InputError
from diffusion.schedules import Schedule


def _per_example_mse(prediction, target):
    """Mean over every axis but the batch: shape (B,)."""
    return jnp.mean((prediction - target) ** 2, axis=tuple(range(1, prediction.ndim)))


def min_snr_weight(snr, gamma: float, parameterization: str):
    """Loss weight min(SNR, gamma) / (what the MSE of this parameterization already weights by).

    Hang et al. 2023 weight the x_0-error of each timestep by
    min(SNR_t, gamma), so that easy low-noise steps (huge SNR) do not dominate
    training. The same weighting, written for a target other than x_0, divides
    by the factor that target's MSE carries relative to the x_0 MSE:

    - x0:  ||x_0 error||^2                   -> weight min(SNR, gamma)
    - eps: ||eps error||^2 = SNR ||x_0 error||^2      -> min(SNR, gamma) / SNR
    - v:   ||v error||^2 = (SNR + 1) ||x_0 error||^2  -> min(SNR, gamma) / (SNR + 1)

    gamma = 5 is the paper's recommended value.
    """
    clipped = jnp.minimum(snr, gamma)
    if parameterization == "x0":
        return clipped
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "v":
        return clipped / (snr + 1.0)
    raise InputError(f"min-SNR weighting is defined for eps, x0 and v (got {parameterization!r})")


def denoising_loss(model, x0, cond, key, *, schedule: Schedule, parameterization: str = "eps", min_snr_gamma=None):
    """The DDPM training loss for a network predicting eps, x0 or v (Ho et al. 2020, Algorithm 1).

    t ~ Uniform{0, ..., T-1}, eps ~ N(0, I), x_t = sqrt(alpha_bar_t) x_0 +
    sqrt(1 - alpha_bar_t) eps (``forward.q_sample``), and the loss is
    ||model(x_t, t, cond) - target||^2 averaged over pixels and batch; with
    ``min_snr_gamma`` each example is weighted by ``min_snr_weight``.
    Returns a scalar.
    """
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, x0.shape[:1], 0, schedule.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    x_t = forward.q_sample(schedule, x0, t, noise)
    signal_scale, noise_scale = forward.vp_scales(schedule, t, x0)
    target = forward.from_x0_eps(x0, noise, parameterization, signal_scale, noise_scale)
    loss = _per_example_mse(model(x_t, t.astype(jnp.float32), cond), target)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(jnp.asarray(schedule.snr, jnp.float32)[t], min_snr_gamma, parameterization)
    return jnp.mean(loss)


def logit_normal_times(key, n: int, mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(u), u ~ N(mean, std^2): flow times in (0, 1) concentrated mid-path (Esser et al. 2024, Sec. 3.1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def flow_matching_loss(model, x0, cond, key, *, logit_mean: float = 0.0, logit_std: float = 1.0):
    """Conditional flow matching on the straight path x_t = (1 - t) x_0 + t eps.

    The network regresses the path's velocity eps - x_0: the conditional
    flow-matching objective of Lipman et al. 2023 on the rectified-flow path
    of Liu et al. 2023, at logit-normal times t (Esser et al. 2024, Sec. 3.1;
    their best-performing "rf/lognorm(0.00, 1.00)" is the default here).
    Returns a scalar.
    """
    key_t, key_noise = jax.random.split(key)
    t = logit_normal_times(key_t, x0.shape[0], logit_mean, logit_std)
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    x_t = forward.flow_interpolate(x0, noise, t)
    return jnp.mean(_per_example_mse(model(x_t, t, cond), forward.flow_velocity(x0, noise)))
