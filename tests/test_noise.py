"""The starting noise: slerp keeps the ends and the radius."""

import jax.numpy as jnp
import numpy as np

from diffusion import noise

def test_slerp_keeps_the_ends_exactly_and_moves_on_the_sphere():
    a, b = noise.seed_noise([1, 2], (28, 28, 1))
    assert np.array_equal(noise.slerp(a, b, 0.0), a) and np.array_equal(noise.slerp(a, b, 1.0), b)

    # Vectors of equal length: every point keeps it, and the angle to a grows linearly with w.
    u = jnp.array([3.0, 0.0, 0.0])
    v = jnp.array([0.0, 3.0 * np.cos(0.3), 3.0 * np.sin(0.3)])
    for w in (0.25, 0.5, 0.8):
        p = noise.slerp(u, v, w)
        np.testing.assert_allclose(jnp.linalg.norm(p), 3.0, rtol=1e-6)
        np.testing.assert_allclose(np.arccos(np.dot(p, u) / 9.0), w * np.pi / 2, atol=1e-6)
    # Nearly parallel vectors: the straight line, without dividing by sin(0).
    np.testing.assert_allclose(noise.slerp(u, 2 * u, 0.5), 1.5 * u, rtol=1e-6)

    # Two Gaussian noises: the midpoint stays at the typical radius sqrt(D); the straight line's falls by sqrt(2).
    radius = np.sqrt(a.size)
    assert abs(float(jnp.linalg.norm(noise.slerp(a, b, 0.5))) / radius - 1) < 0.05
    assert abs(float(jnp.linalg.norm((a + b) / 2)) / radius - 1 / np.sqrt(2)) < 0.05
