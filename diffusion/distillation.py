"""Few-step students of a trained teacher: progressive distillation and consistency distillation (LCM).

A deterministic sampler (DDIM with eta = 0) turns each noise x_T into one
image: with the teacher network it is a fixed map from noise to data, one that
takes the teacher tens of network calls to evaluate. A student network that
starts from the teacher's weights can learn the same map in far fewer calls.

**Progressive distillation** (Salimans & Ho 2022, Alg. 2). The student learns
to do in one DDIM step what the teacher does in two: from x_t, two teacher
steps t -> t' -> t'' land on x_t''; the student's target is the x_0 that one
DDIM step t -> t'' would have to predict to land there (``progressive_target``).
Trained, the student samples in N steps as well as the teacher did in 2N; it
then becomes the teacher of the next stage: 64 -> 32 -> ... -> 1 steps. The
grids are DDIM's trailing grids, which nest: the N-step grid is every other
timestep of the 2N-step grid.

**Consistency distillation** (Song et al. 2023, Alg. 2), in the guided form of
latent consistency models (LCM, Luo et al. 2023, Alg. 1). The student is a
consistency function f(x_t, t) that maps every point of a probability-flow ODE
trajectory to the trajectory's origin. It is parameterised so that
f(x, 0) = x holds exactly (``forward.consistency_function``: c_skip, c_out), and
trained to give the same answer at two neighbouring points of one trajectory:
x_t, drawn from the forward process, and x_s, one DDIM step of the teacher
further down (s = t - k, k the skipping step), the latter through the target
network, an EMA of the student's weights, without gradient. The timesteps are
LCM's: t on the grid k - 1, 2k - 1, ..., T - 1 of T / k "origin" steps.
``diffusion.samplers``' ``lcm`` sampler then alternates f and fresh noise.

**Guidance.** Both students take the guidance scale s as an input
(``diffusion.unet``'s guidance embedding; Meng et al. 2023 for progressive
distillation, LCM's w-embedding for consistency models): the teacher is guided
with classifier-free guidance at a scale drawn for each example from
[guidance_min, guidance_max], and the student learns the guided map in one
network call, so a guided student costs half as much per step as its teacher
and the scale stays the user's choice.

The losses are pure functions of (student, teacher, target, x_0, labels, key),
jitted inside the train step (``diffusion.training``). A *predictor* here is
``(x_t, t, labels, s) -> x0_hat`` on integer timesteps t of the schedule.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import forward
from diffusion.forward import consistency_function
from diffusion.samplers import vp_grid
from diffusion.schedules import Schedule, origin_timesteps

METHODS = ("progressive", "consistency")
CONSISTENCY_LOSSES = ("huber", "l2")

Predictor = Callable  # (x_t, t, labels, s) -> x0_hat


def ddim_jump(x_t, x0_hat, alpha_bar, alpha_bar_next):
    """The deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0) from level alpha_bar to
    alpha_bar_next, given the prediction x0_hat; alpha_bar_next = 1 returns x0_hat."""
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    eps = (x_t - forward.expand_to(a, x_t) * x0_hat) / forward.expand_to(s, x_t)
    return forward.expand_to(jnp.sqrt(alpha_bar_next), x_t) * x0_hat + forward.expand_to(
        jnp.sqrt(1.0 - alpha_bar_next), x_t
    ) * eps


def progressive_target(x_t, x_next, alpha_bar, alpha_bar_next):
    """The x_0 that one DDIM step from x_t (level alpha_bar) must predict to land on x_next (level
    alpha_bar_next): Salimans & Ho 2022, Alg. 2, x~ = (x_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' -
    (sigma_t''/sigma_t) alpha_t), with alpha = sqrt(alpha_bar) and sigma = sqrt(1 - alpha_bar)."""
    ratio = forward.expand_to(jnp.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar)), x_t)
    a, a_next = forward.expand_to(jnp.sqrt(alpha_bar), x_t), forward.expand_to(jnp.sqrt(alpha_bar_next), x_t)
    return (x_next - ratio * x_t) / (a_next - ratio * a)


# --- Predictors: teachers and students as (x_t, t, labels, s) -> x0_hat -------------------


def _x0(prediction, parameterization, x_t, alpha_bar):
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    x0, _ = forward.to_x0_eps(prediction, parameterization, x_t, forward.expand_to(a, x_t), forward.expand_to(s, x_t))
    return x0


def guided_predictor(model, parameterization: str, schedule: Schedule, null_label: int) -> Predictor:
    """A class-conditional model under classifier-free guidance at a scale s per example (Ho & Salimans 2021,
    eq. 6: uncond + s (cond - uncond)), both branches as one call on a doubled batch."""
    alpha_bars = jnp.asarray(schedule.alpha_bar, jnp.float32)

    def predict(x_t, t, labels, scale):
        null = jnp.full_like(labels, null_label)
        both = model(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
        conditional, unconditional = jnp.split(both, 2)
        guided = unconditional + forward.expand_to(scale, x_t) * (conditional - unconditional)
        return _x0(guided, parameterization, x_t, alpha_bars[t])

    return predict


def student_predictor(model, parameterization: str, schedule: Schedule) -> Predictor:
    """A distilled student, which takes the guidance scale as an input: one call."""
    alpha_bars = jnp.asarray(schedule.alpha_bar, jnp.float32)

    def predict(x_t, t, labels, scale):
        return _x0(model(x_t, t, labels, guidance=scale), parameterization, x_t, alpha_bars[t])

    return predict


# --- The losses ---------------------------------------------------------------------------


def _draws(key, x0, guidance_range):
    """Noise like x0 and a guidance scale per example, uniform in ``guidance_range``."""
    key_noise, key_scale = jax.random.split(key)
    scale = jax.random.uniform(key_scale, x0.shape[:1], minval=guidance_range[0], maxval=guidance_range[1])
    return jax.random.normal(key_noise, x0.shape, x0.dtype), scale


def teacher_grid(schedule: Schedule, teacher_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's DDIM grid (trailing spacing): timesteps (2N,) and levels alpha_bar (2N + 1,), ending at 1.
    The student's N-step grid is every other entry of both."""
    grid = vp_grid(schedule, teacher_steps, "trailing")
    return grid.timesteps.astype(np.int32), grid.alpha_bar


def progressive_loss(student: Predictor, teacher: Predictor, x0, labels, key, *, schedule: Schedule,
                     teacher_steps: int, guidance_range: tuple[float, float]):
    """Progressive distillation's loss (Salimans & Ho 2022, Alg. 2) on a batch of data x0.

    Each example gets a student step i of the N = teacher_steps / 2 step grid, noise and a guidance scale;
    x_t is drawn from q(x_t | x_0) at the step's timestep, the teacher takes its two DDIM steps from there, and
    the student's x0_hat is pulled to ``progressive_target`` with the weight 1 / (1 - alpha_bar) = SNR + 1 (the
    paper's "SNR+1" weighting: the squared error of a v-prediction).
    """
    timesteps, alpha_bars = (jnp.asarray(a) for a in teacher_grid(schedule, teacher_steps))
    key_step, key_draws = jax.random.split(key)
    i = 2 * jax.random.randint(key_step, x0.shape[:1], 0, teacher_steps // 2)  # the teacher's index of the step
    noise, scale = _draws(key_draws, x0, guidance_range)
    t, t_mid = timesteps[i], timesteps[i + 1]
    alpha_bar, alpha_bar_mid, alpha_bar_next = alpha_bars[i], alpha_bars[i + 1], alpha_bars[i + 2]
    x_t = forward.expand_to(jnp.sqrt(alpha_bar), x0) * x0 + forward.expand_to(jnp.sqrt(1.0 - alpha_bar), x0) * noise
    x_mid = ddim_jump(x_t, teacher(x_t, t, labels, scale), alpha_bar, alpha_bar_mid)
    x_next = ddim_jump(x_mid, teacher(x_mid, t_mid, labels, scale), alpha_bar_mid, alpha_bar_next)
    target = jax.lax.stop_gradient(progressive_target(x_t, x_next, alpha_bar, alpha_bar_next))
    squared = jnp.mean(jnp.square(student(x_t, t, labels, scale) - target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(squared / (1.0 - alpha_bar))


def pseudo_huber(a, b, c: float):
    """sqrt((a - b)^2 + c^2) - c, elementwise (Song & Dhariwal 2023, Sec. 3.3; the LCM training script's
    "huber" loss): squared for |a - b| << c, absolute beyond."""
    return jnp.sqrt(jnp.square(a - b) + c**2) - c


def consistency_loss(student: Predictor, target: Predictor, teacher: Predictor, x0, labels, key, *,
                     schedule: Schedule, origin_steps: int, guidance_range: tuple[float, float], loss: str = "huber",
                     huber_c: float = 0.001):
    """Consistency distillation's loss (Song et al. 2023, Alg. 2; LCM, Alg. 1) on a batch of data x0.

    Each example gets a timestep t of the origin grid (``diffusion.schedules.origin_timesteps``), noise and a
    guidance scale; x_t is drawn from q(x_t | x_0), the guided teacher takes one DDIM step from t to
    s = max(t - k, 0) (k = T // origin_steps, the skipping step), and the student's
    f(x_t, t) is pulled to the target network's f(x_s, s), which gets no gradient. ``loss``: ``huber``
    (``pseudo_huber`` with ``huber_c``) or ``l2``, averaged over every value.
    """
    origins = jnp.asarray(origin_timesteps(schedule.num_timesteps, origin_steps), jnp.int32)
    skip = schedule.num_timesteps // origin_steps
    alpha_bars = jnp.asarray(schedule.alpha_bar, jnp.float32)
    key_step, key_draws = jax.random.split(key)
    t = origins[jax.random.randint(key_step, x0.shape[:1], 0, len(origins))]
    s = jnp.maximum(t - skip, 0)
    noise, scale = _draws(key_draws, x0, guidance_range)
    alpha_bar, alpha_bar_s = alpha_bars[t], alpha_bars[s]
    x_t = forward.expand_to(jnp.sqrt(alpha_bar), x0) * x0 + forward.expand_to(jnp.sqrt(1.0 - alpha_bar), x0) * noise
    x_s = ddim_jump(x_t, teacher(x_t, t, labels, scale), alpha_bar, alpha_bar_s)
    f_target = jax.lax.stop_gradient(consistency_function(target(x_s, s, labels, scale), x_s, s))
    f_student = consistency_function(student(x_t, t, labels, scale), x_t, t)
    if loss == "l2":
        return jnp.mean(jnp.square(f_student - f_target))
    return jnp.mean(pseudo_huber(f_student, f_target, huber_c))
