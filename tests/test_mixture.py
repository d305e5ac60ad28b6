"""The exact denoiser of a Gaussian mixture: score, Tweedie, Monte Carlo, every parameterization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import forward, mixture
from diffusion.schedules import Schedule


@pytest.fixture(scope="module")
def mix():
    return mixture.random_mixture(seed=3, num_components=4, dim=3)


def test_noised_density_is_normalised_in_1d():
    m = mixture.make_mixture([1.0, 3.0], [[-1.0], [2.0]], [0.3, 0.5])
    grid = np.linspace(-12, 12, 48_001)
    for a, s in [(1.0, 0.0), (0.8, 0.6), (0.1, 0.995)]:
        p = np.exp(np.asarray(mixture.log_density(m, jnp.asarray(grid[:, None], jnp.float32), a, s), np.float64))
        assert np.sum(p) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-4)


def test_score_equals_finite_differences_of_the_log_density(mix):
    with jax.enable_x64(True):
        m = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, mix)
        x = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
        a, s, h = 0.7, np.sqrt(1 - 0.49), 1e-5
        grad_fd = np.zeros((16, 3))
        for d in range(3):
            e = jnp.zeros(3).at[d].set(h)
            grad_fd[:, d] = (mixture.log_density(m, x + e, a, s) - mixture.log_density(m, x - e, a, s)) / (2 * h)
        np.testing.assert_allclose(mixture.score(m, x, a, s), grad_fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("a, s", [(0.99, 0.14), (0.6, 0.8), (0.05, 0.9987)])
def test_tweedie_formula(mix, a, s):
    # E[x_0 | x_t] = (x_t + s^2 grad log p(x_t)) / a: the closed-form posterior mean against the
    # autodiff gradient of the log-density (two independent routes to the same number).
    x = jax.random.normal(jax.random.key(2), (32, 3))
    grad = jax.vmap(jax.grad(lambda xi: mixture.log_density(mix, xi[None], a, s)[0]))(x)
    np.testing.assert_allclose(mixture.posterior_mean(mix, x, a, s), (x + s**2 * grad) / a, rtol=2e-4, atol=2e-4)


def test_posterior_mean_agrees_with_monte_carlo():
    # Draw many (x_0, x_t) pairs from a 1-D mixture, bin them by x_t and average x_0 per bin: the
    # empirical E[x_0 | x_t] must match the closed form within a few standard errors.
    m = mixture.make_mixture([1.0, 2.0, 1.0], [[-2.0], [0.0], [1.5]], [0.2, 0.5, 0.3])
    a, s, n = 0.6, 0.8, 400_000
    x0, _ = mixture.sample(m, jax.random.key(0), n)
    x_t = a * x0 + s * jax.random.normal(jax.random.key(1), x0.shape)
    x0, x_t = np.asarray(x0[:, 0]), np.asarray(x_t[:, 0])
    edges = np.linspace(-2.0, 2.0, 21)
    which = np.digitize(x_t, edges) - 1
    for b in range(len(edges) - 1):
        in_bin = which == b
        centre = 0.5 * (edges[b] + edges[b + 1])
        exact = float(mixture.posterior_mean(m, jnp.array([[centre]]), a, s)[0, 0])
        stderr = x0[in_bin].std() / np.sqrt(in_bin.sum())
        # Bin width adds a small bias (the slope of E[x0|x_t] times the spread within the bin).
        assert abs(x0[in_bin].mean() - exact) < 5 * stderr + 0.02, f"bin at {centre}"


def test_sampling_follows_the_weights():
    m = mixture.ring_mixture()
    x, component = mixture.sample(m, jax.random.key(0), 40_000)
    counts = np.bincount(np.asarray(component), minlength=8) / 40_000
    np.testing.assert_allclose(counts, 1 / 8, atol=0.01)
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=1).mean(), 2.0, atol=0.02)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "score"])
def test_exact_denoiser_in_every_parameterization(mix, parameterization):
    # Whatever it predicts, converting back gives the same posterior mean, at the schedule's alpha_bar.
    sched = Schedule("linear")
    denoiser = mixture.exact_denoiser(mix, sched, parameterization)
    x = jax.random.normal(jax.random.key(4), (8, 3))
    t = jnp.array([0, 10, 100, 300, 500, 700, 900, 999])
    a, s = forward.vp_scales(sched, t, x)
    x0, eps = forward.to_x0_eps(denoiser(x, t), parameterization, x, a, s)
    expected = mixture.posterior_mean(mix, x, a[:, 0], s[:, 0])
    np.testing.assert_allclose(x0, expected, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(a * x0 + s * eps, x, atol=1e-4)


def test_exact_denoiser_at_fractional_timesteps_is_between_its_neighbours():
    m = mixture.make_mixture([1.0], [[1.0]], [0.5])  # one Gaussian: E[x0|x_t] is linear in x_t
    denoiser = mixture.exact_denoiser(m, Schedule("linear"), "x0")
    x = jnp.array([[0.3]])
    lo, mid, hi = (float(denoiser(x, t)[0, 0]) for t in (400.0, 400.5, 401.0))
    assert min(lo, hi) < mid < max(lo, hi)


def test_exact_flow_velocity_is_the_conditional_expectation():
    # On x_t = (1-t) x_0 + t eps the optimal velocity is E[eps - x_0 | x_t]; for one Gaussian
    # N(mu, std^2) that is linear in x_t and can be written down directly.
    mu, std, t = 1.5, 0.5, 0.4
    m = mixture.make_mixture([1.0], [[mu]], [std])
    x = jnp.linspace(-2, 3, 7)[:, None]
    var = (1 - t) ** 2 * std**2 + t**2
    x0_mean = mu + (1 - t) * std**2 / var * (x - (1 - t) * mu)
    np.testing.assert_allclose(mixture.exact_flow_velocity(m)(x, t), (x - x0_mean) / t, rtol=1e-5, atol=1e-5)


def test_condition_restricts_to_a_class_and_null_keeps_all():
    m = mixture.ring_mixture(num_modes=4, radius=2.0, std=0.1, num_classes=2)  # classes 0, 1, 0, 1
    x = jnp.zeros((3, 2))  # equidistant from all four modes
    a, s = 0.5, np.sqrt(0.75)
    x0 = mixture.posterior_mean(m, x, a, s, cond=jnp.array([0, 1, 2]))
    # Class 0 holds the modes at angles 0 and pi: they cancel in x, as all four do unconditionally.
    np.testing.assert_allclose(x0, 0.0, atol=1e-5)
    x = jnp.array([[0.5, 0.6], [0.5, 0.6], [0.5, 0.6]])
    x0 = mixture.posterior_mean(m, x, a, s, cond=jnp.array([0, 1, 2]))
    assert x0[0, 0] > 1.0, "class 0 pulls towards its mode at (2, 0)"
    assert abs(x0[1, 0]) < 0.1 and x0[1, 1] > 1.0, "class 1 pulls towards its mode at (0, 2)"
    np.testing.assert_allclose(x0[2], mixture.posterior_mean(m, x[:1], a, s)[0], atol=1e-6)


def test_mixture_passes_through_jit():
    m = mixture.ring_mixture()
    f = jax.jit(lambda m, x: mixture.posterior_mean(m, x, 0.5, 0.8, cond=jnp.array([0])))
    np.testing.assert_allclose(f(m, jnp.ones((1, 2))), mixture.posterior_mean(m, jnp.ones((1, 2)), 0.5, 0.8, cond=jnp.array([0])), rtol=1e-6)


def test_bad_mixture_parameters():
    with pytest.raises(ValueError, match="positive"):
        mixture.make_mixture([1.0, -1.0], [[0.0], [1.0]], 0.1)
    with pytest.raises(ValueError, match="means"):
        mixture.make_mixture([1.0, 1.0], [0.0, 1.0], 0.1)
