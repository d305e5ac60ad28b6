"""The starting noise of a generation: one draw per seed, and paths between draws.

The initial noise of seed s is ``jax.random.normal(jax.random.key(s), shape)``,
whatever else is generated beside it (``seed_noise``), so a seed names the same
picture in any batch. Between two seeds' noises, ``slerp`` walks the great
circle, which keeps the noise at the variance the model expects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def slerp(a, b, w):
    """Spherical linear interpolation from a (w = 0) to b (w = 1): Shoemake's slerp (SIGGRAPH 1985).

    slerp = sin((1 - w) omega) / sin(omega) a + sin(w omega) / sin(omega) b,
    omega the angle between a and b (as flat vectors). Why noise is
    interpolated this way (White 2016, "Sampling generative networks"): a
    standard Gaussian in D dimensions lies near the sphere of radius sqrt(D),
    and two draws are nearly orthogonal, so the straight line between them
    passes at only 1/sqrt(2) of that radius (noise of too little variance,
    which the model never saw at the start; on the course's digit model it
    gives plainer, more typical digits rather than a blur, notebook 08), while
    the great circle stays on it.
    The ends are a and b exactly; nearly parallel a and b fall back to the
    straight line.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    cos = jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(omega)
    parallel = sin < 1e-6
    safe = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe)
    wb = jnp.where(parallel, w, jnp.sin(w * omega) / safe)
    return wa * a + wb * b


def seed_noise(seeds, shape) -> jax.Array:
    """The initial noise of each seed, (len(seeds), *shape): ``jax.random.normal(jax.random.key(seed), shape)``.

    Drawn for all seeds at once (vmap), with the same bits as one seed at a time.
    """
    draw = jax.vmap(lambda seed: jax.random.normal(jax.random.key(seed), shape))
    return draw(np.asarray(seeds, np.uint32))
