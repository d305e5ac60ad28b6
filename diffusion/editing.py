"""Editing with a diffusion model: img2img, inpainting and DDIM inversion, for every sampler.

All three reuse the samplers of ``diffusion.samplers`` and their compiled
driver; only where the run starts, or what happens after each step, changes.

- img2img (SDEdit, Meng et al. 2022): noise the input to the level a fraction
  ``strength`` of the way up the sampler's grid, then run only the remaining steps.
- Inpainting: after every step the known region is noised afresh to the new
  level and pasted in; RePaint (Lugmayr et al. 2022) repeats each step
  ``resample`` times, diffusing back one level in between, so that the generated
  region can adapt to the known one.
- DDIM inversion: run DDIM's deterministic update backwards, from an image to
  the noise that DDIM would turn into it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion import samplers
from diffusion.errors import InputError, is_whole


def img2img(
    denoiser, x0, noise, *, strength: float, sampler: str, key=None, cond=None, return_trajectory=False,
    python_loop=False, **settings,
) -> samplers.Result:
    """SDEdit (Meng et al. 2022, Sec. 3): start ``sampler`` from x0 noised part of the way.

    Of the sampler's N steps the last int(N * strength) are run (the rounding of
    the common img2img pipelines), from x0 noised to the level of the first of
    them: strength 0 returns x0, strength 1 runs every step from q(x_T | x0),
    which is ordinary sampling when alpha_bar is 0 at the start (zero terminal
    SNR) and carries a faint trace of x0 otherwise. ``settings`` are those of
    ``samplers.sample`` (schedule, steps, parameterization, spacing, ...).
    """
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1] (got {strength!r}): 0 keeps the input, 1 samples afresh")
    plan = samplers.make_plan(sampler, **settings)
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    if noise.shape != x0.shape:
        raise InputError(f"noise must have the input's shape {x0.shape} (got {noise.shape})")
    plan = plan.last_steps(int(plan.steps * strength))
    signal, noise_scale = plan.family.scales(plan.grid)
    x_start = jnp.asarray(signal[0], x0.dtype) * x0 + jnp.asarray(noise_scale[0], x0.dtype) * noise
    return samplers.run(
        plan, denoiser, x_start, key=key, cond=cond, return_trajectory=return_trajectory, python_loop=python_loop
    )


@dataclasses.dataclass(frozen=True)
class _Paste:
    """Wraps a sampler's step: paste the known region after it; with resample > 1, RePaint's loop around it."""

    resample: int

    def __call__(self, step, args):
        x_known, mask, signal, noise = args  # signal, noise: how the sampler's state holds x0 and eps, per frame
        last = len(signal) - 2

        def attempt(x, history, i, key):
            """One step from frame i, then the known region re-noised to frame i + 1 and pasted."""
            key_step, key_known = jax.random.split(key)
            (x, history), x0 = step((x, history), i, key_step)
            known = signal[i + 1] * x_known + noise[i + 1] * jax.random.normal(key_known, x.shape, x.dtype)
            return (mask * known + (1.0 - mask) * x, history), x0

        def diffuse_back(x, i, key):
            """Sample the forward process from frame i + 1 back to frame i."""
            ratio = signal[i] / signal[i + 1]
            std = jnp.sqrt(jnp.maximum(noise[i] ** 2 - (ratio * noise[i + 1]) ** 2, 0.0))
            return ratio * x + std * jax.random.normal(key, x.shape, x.dtype)

        def inpaint_step(state, i, key):
            x, history = state

            def resample(u, x):
                (x, _), _ = attempt(x, history, i, jax.random.fold_in(key, 2 * u))
                return diffuse_back(x, i, jax.random.fold_in(key, 2 * u + 1))

            repeats = jnp.where(i < last, self.resample - 1, 0)  # RePaint does not resample the last step
            x = lax.fori_loop(0, repeats, resample, x)
            return attempt(x, history, i, jax.random.fold_in(key, 2 * repeats))

        return inpaint_step


def inpaint(
    denoiser, x_known, mask, x_T, *, sampler: str, key, cond=None, resample: int = 1, return_trajectory=False,
    python_loop=False, **settings,
) -> samplers.Result:
    """Fill in where ``mask`` is 0, keeping x_known where it is 1, with any sampler.

    After each step the known region, noised to the new level, replaces the
    sample there (the "replacement" method, Song et al. 2021, Sec. 5 and App. I);
    at the last level it is x_known itself. resample = U > 1 is RePaint
    (Lugmayr et al. 2022, Alg. 1, jump length 1): each step but the last is
    taken U times, diffusing back one level in between; NFE grows about U-fold.
    mask: 1 = known, 0 = to generate, broadcastable to x_known's shape.
    ``settings`` are those of ``samplers.sample``.
    """
    if not is_whole(resample, 1):
        raise InputError(f"resample must be a whole number >= 1 (got {resample!r}); 1 means no RePaint resampling")
    if key is None:
        raise InputError("inpainting noises the known region at every step: pass key=jax.random.key(seed)")
    plan = samplers.make_plan(sampler, **settings)
    if resample > 1 and plan.sampler.history:
        raise InputError(
            f"RePaint resampling repeats steps, which the history of the multistep sampler {sampler!r} cannot follow; "
            "use resample=1, or a one-step sampler (ddpm, ddim, euler, euler_a, heun, flow_euler, flow_heun)"
        )
    x_known, mask, x_T = jnp.asarray(x_known), jnp.asarray(mask), jnp.asarray(x_T)
    if x_known.shape != x_T.shape:
        raise InputError(f"x_known and x_T must have the same shape (got {x_known.shape} and {x_T.shape})")
    try:
        mask = jnp.broadcast_to(mask, x_known.shape).astype(x_known.dtype)
    except ValueError:
        raise InputError(f"mask of shape {mask.shape} does not fit images of shape {x_known.shape}") from None
    signal, noise = plan.family.scales(plan.grid)
    factor = plan.family.state_factor(plan.grid)
    as_x = lambda a: jnp.asarray(a, x_known.dtype)  # noqa: E731
    edit = samplers.Edit(_Paste(int(resample)), (x_known, mask, as_x(signal * factor), as_x(noise * factor)))
    result = samplers.run(
        plan, denoiser, x_T, key=key, cond=cond, return_trajectory=return_trajectory, python_loop=python_loop,
        edit=edit,
    )
    calls = plan.sampler.calls(plan.grid)
    return result._replace(nfe=int(resample * np.sum(calls[:-1]) + calls[-1]))


def ddim_inversion_step(predict, grid, state, i, key):
    """DDIM run backwards, from alpha_bar[i] up to the noisier alpha_bar[i + 1] (Song et al. 2021, Sec. 4.3).

    eps is predicted from x at the next level's timestep (x_{t+1} being unknown
    yet), as the common inversion code does; this is exact in the limit of small
    steps, where DDIM is the probability-flow ODE.
    """
    x, _ = state
    alpha_bar, alpha_bar_next = grid.alpha_bar[i], grid.alpha_bar[i + 1]
    _, eps = predict(x, grid.timesteps[i], alpha_bar_next)
    x0 = (x - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    return (jnp.sqrt(alpha_bar_next) * x0 + jnp.sqrt(1.0 - alpha_bar_next) * eps, None), x0


DDIM_INVERSION = samplers.Sampler(ddim_inversion_step, "vp", "leading")


def ddim_invert(
    denoiser, x0, *, cond=None, return_trajectory=False, python_loop=False, **settings
) -> samplers.Result:
    """The noise x_T from which deterministic DDIM with the same ``settings`` returns to x0.

    Walks DDIM's grid in reverse, from alpha_bar = 1 up to its first timestep;
    ``settings`` are those of ``samplers.sample`` for sampler ``ddim`` (eta must
    stay 0). Feed ``result.x`` to ``sample(..., sampler="ddim")`` with the same
    settings to come back; the round trip's error shrinks with the steps.
    """
    if settings.get("eta", 0.0) != 0.0:
        raise InputError("DDIM inversion follows the deterministic path: leave eta at 0")
    plan = samplers.make_plan("ddim", **settings)
    grid = plan.grid
    inverse = samplers.VPGrid(grid.timesteps[::-1], grid.alpha_bar[::-1])
    plan = dataclasses.replace(plan, sampler=DDIM_INVERSION, grid=inverse, options=())
    return samplers.run(plan, denoiser, x0, cond=cond, return_trajectory=return_trajectory, python_loop=python_loop)
