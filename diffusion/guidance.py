"""Classifier-free guidance: a denoiser wrapper that works with every sampler.

A model trained with its condition sometimes dropped (replaced by a null
label) predicts both p(x | c) and p(x). Ho & Salimans 2021 (eq. 6, with
scale = 1 + w) sample with

    pred = pred(x, t, negative) + scale * (pred(x, t, c) - pred(x, t, negative)),

negative being the null condition. scale = 1 is the conditional model; scale > 1
follows grad log p(x | c) + (scale - 1) grad log p(c | x): sharper, less diverse
samples of class c. Putting another condition in the negative branch pushes
samples away from it: this is what "negative prompts" are.

The combination is affine with weights summing to one, so it gives the same
result whichever of eps, x0, v or velocity the model predicts; the two branches
run as one network call on a doubled batch.

Guidance in a limited interval (Kynkäänniemi et al. 2024) applies the scale
only at middle noise levels and uses the plain conditional prediction
elsewhere: at high noise, where the layout of the image is chosen, guidance
pulls every sample towards the same few modes (less diversity), and at low
noise it does little but sharpen. ``interval`` is given in the denoiser's own
time (a timestep of the schedule, or flow time); ``generate`` converts the
paper's sigma interval. As in the paper's code, the choice is made once per
sampler step, by the step's own time (``Guided.at_step``): all the network calls
of a step, Heun's corrector included, are guided or none are. A step outside
the interval calls the network on the conditional batch alone (``lax.cond``),
so it costs half a guided step.

Guidance rescale (Lin et al. 2023, eq. 15-16) counters the over-saturation of
large scales: the guided prediction is rescaled to the standard deviation of
the conditional one, and mixed with the plain guided prediction by ``rescale``.
Like the paper's code and the common implementations it acts on the model's own
output (v there), so its effect depends on the parameterization.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffusion.errors import InputError


def rescale_guidance(guided, conditional, rescale: float):
    """Lin et al. 2023, eq. 15-16: mix ``guided`` with itself rescaled to the per-example std of ``conditional``."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (jnp.std(conditional, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
    return rescale * rescaled + (1.0 - rescale) * guided


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Guided:
    """A guided denoiser ``(x, t, cond) -> prediction``; build it with ``classifier_free_guidance``.

    A pytree: the wrapped denoiser's arrays (an NNX module's weights) and the
    negative condition stay arguments of the sampler's compiled program.
    """

    denoiser: Callable
    negative: Any
    scale: float = dataclasses.field(metadata=dict(static=True))
    rescale: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    interval: tuple[float, float] | None = dataclasses.field(default=None, metadata=dict(static=True))
    step_time: Any = None  # set by ``at_step``: the time that decides guidance, in place of each call's own

    def at_step(self, t) -> Guided:
        """This denoiser for every network call of the sampler step at time t: guided as t says, whatever the
        time of the call (Kynkäänniemi et al. 2024 decide per step, so a step is guided or unguided throughout).
        """
        return self if self.interval is None else dataclasses.replace(self, step_time=t)

    def __call__(self, x, t, cond):
        if cond is None:
            raise InputError("classifier-free guidance needs a condition: pass cond (one per example) to the sampler")
        cond = jnp.asarray(cond)
        t = jnp.broadcast_to(t, x.shape[:1])
        if self.interval is None:
            return self._guide(x, t, cond, self.scale)
        low, high = self.interval  # the conditional prediction (scale 1) outside [low, high]
        when = t if self.step_time is None else jnp.broadcast_to(self.step_time, t.shape)
        inside = (when >= low) & (when <= high)
        scale = jnp.where(inside, self.scale, 1.0).reshape(-1, *(1,) * (x.ndim - 1))
        # A step outside the interval needs no unconditional branch: one network call on the plain batch.
        return lax.cond(jnp.any(inside), lambda: self._guide(x, t, cond, scale), lambda: self.denoiser(x, t, cond))

    def _guide(self, x, t, cond, scale):
        """Both branches as one call on a doubled batch, combined with ``scale`` (eq. 6), then rescaled."""
        negative = jnp.broadcast_to(jnp.asarray(self.negative, cond.dtype), cond.shape)
        both = self.denoiser(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, negative]))
        conditional, unconditional = jnp.split(both, 2)
        guided = unconditional + scale * (conditional - unconditional)
        return rescale_guidance(guided, conditional, self.rescale) if self.rescale else guided


def classifier_free_guidance(
    denoiser, scale: float, negative, *, rescale: float = 0.0, interval: tuple[float, float] | None = None
) -> Guided:
    """Guide ``denoiser`` with strength ``scale`` away from the condition ``negative`` (Ho & Salimans 2021, eq. 6).

    negative: the condition of the second branch -- the null label the model
    was trained with for unconditional guidance, or any other condition (a
    "negative prompt"); a scalar or one per example. rescale in [0, 1]:
    guidance rescale of Lin et al. 2023 (0 = off, 0.7 in the paper).
    interval (low, high): guide only at times t with low <= t <= high, in the
    denoiser's own time (Kynkäänniemi et al. 2024); None guides at every step.
    """
    if not callable(denoiser):
        raise InputError(f"the denoiser must be a function (x, t, cond) -> prediction (got {type(denoiser).__name__})")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"the guidance scale must be a finite number (got {scale!r}); 1 means no guidance")
    if not 0.0 <= rescale <= 1.0:
        raise InputError(f"rescale must be in [0, 1] (got {rescale}); 0 turns it off, the paper uses 0.7")
    if interval is not None:
        numbers = len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval)
        if not numbers or not interval[0] <= interval[1]:
            raise InputError(f"the guidance interval is two times (low, high) with low <= high (got {interval!r})")
        interval = (float(interval[0]), float(interval[1]))
    return Guided(denoiser, negative, float(scale), float(rescale), interval)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmbeddedGuidance:
    """A distilled student ``(x, t, cond) -> prediction`` at guidance scale ``scale``; build it with
    ``embedded_guidance``. The student has learnt its teacher's guided prediction in one network call, so there
    is no second branch: the scale is an input of the network (``diffusion.unet``'s guidance embedding)."""

    denoiser: Callable  # (x, t, cond, guidance) -> prediction
    scale: float = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x, t, cond):
        return self.denoiser(x, t, cond, jnp.full(x.shape[:1], self.scale, jnp.float32))


def embedded_guidance(denoiser, scale: float) -> EmbeddedGuidance:
    """A guidance-distilled student (Meng et al. 2023; LCM's w-embedding, Luo et al. 2023) at the guidance scale
    ``scale``, one network call per step whatever the scale."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"the guidance scale must be a finite number (got {scale!r}); 1 means no guidance")
    return EmbeddedGuidance(denoiser, float(scale))
