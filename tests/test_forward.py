"""The forward process: closed form against the step-by-step chain, the posterior, conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import forward
from diffusion.schedules import Schedule

SCHED = Schedule("linear", 1000)


def test_closed_form_matches_the_iterated_chain():
    # Run the chain x_0 -> x_1 -> ... one q_step at a time (Ho et al. eq. 2) and compare the
    # distribution of x_t at a few t with q_sample's one jump (eq. 4): mean sqrt(alpha_bar) x_0,
    # variance 1 - alpha_bar. Tolerances are 5 standard errors of the estimates.
    n = 20_000
    x0 = jnp.broadcast_to(jnp.array([-1.0, 0.3, 1.0]), (n, 3))
    check_at = (0, 9, 199, 999)

    def chain_step(x, t):
        x = forward.q_step(SCHED, x, t, jax.random.normal(jax.random.fold_in(jax.random.key(0), t), x.shape))
        return x, x

    _, path = jax.lax.scan(chain_step, x0, jnp.arange(1000))
    for t in check_at:
        chain = np.asarray(path[t], np.float64)
        jump = np.asarray(forward.q_sample(SCHED, x0, t, jax.random.normal(jax.random.key(t + 1), x0.shape)), np.float64)
        mean, var = np.sqrt(SCHED.alpha_bar[t]) * np.asarray(x0[0]), 1 - SCHED.alpha_bar[t]
        for samples in (chain, jump):
            np.testing.assert_allclose(samples.mean(0), mean, atol=5 * np.sqrt(var / n))
            np.testing.assert_allclose(samples.var(0), var, atol=5 * var * np.sqrt(2 / n))
        # And the two sets of samples agree with each other in their quantiles.
        qs = [0.05, 0.25, 0.5, 0.75, 0.95]
        np.testing.assert_allclose(np.quantile(chain, qs, axis=0), np.quantile(jump, qs, axis=0), atol=0.04 * np.sqrt(var) + 0.01)


@pytest.mark.parametrize("t", [0, 1, 50, 500, 999])
def test_posterior_matches_bayes_rule_on_a_grid(t):
    # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0). Evaluate that
    # product on a fine 1-D grid and compare its mean and variance with eq. 6-7.
    x0, x_t = 0.7, -0.4
    mean, var = forward.posterior_mean_variance(SCHED, jnp.array([x0]), jnp.array([x_t]), jnp.array([t]))
    if t == 0:
        assert float(mean[0]) == pytest.approx(x0, abs=1e-6) and float(var[0]) == 0.0
        return
    ab_prev, beta = SCHED.alpha_bar[t - 1], SCHED.betas[t]
    grid = np.linspace(-6, 6, 400_001)
    log_p = -((x_t - np.sqrt(1 - beta) * grid) ** 2) / (2 * beta) - (grid - np.sqrt(ab_prev) * x0) ** 2 / (2 * (1 - ab_prev))
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    grid_mean = np.sum(p * grid)
    grid_var = np.sum(p * (grid - grid_mean) ** 2)
    assert float(mean[0]) == pytest.approx(grid_mean, abs=1e-5)
    assert float(var[0]) == pytest.approx(grid_var, rel=1e-3)


def _random_x0_eps(shape=(64, 5)):
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
def test_conversions_round_trip_on_the_vp_path(kind):
    x0, eps = _random_x0_eps()
    t = jnp.arange(0, 1000, 1000 // 64)[:64]
    a, s = forward.vp_scales(SCHED, t, x0)
    x_t = a * x0 + s * eps
    prediction = forward.from_x0_eps(x0, eps, kind, a, s)
    x0_back, eps_back = forward.to_x0_eps(prediction, kind, x_t, a, s)
    # Recovering x_0 from eps divides by sqrt(alpha_bar) (down to 6e-3 here): allow for that.
    np.testing.assert_allclose(x0_back, x0, atol=2e-3 if kind in ("eps", "score") else 1e-5)
    np.testing.assert_allclose(eps_back, eps, atol=1e-5)


def test_v_prediction_definition():
    # Salimans & Ho 2022: v = alpha eps - sigma x (their alpha, sigma are our signal and noise scales).
    a, s = jnp.float32(0.6), jnp.float32(0.8)
    x0, eps = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    np.testing.assert_allclose(forward.from_x0_eps(x0, eps, "v", a, s), [0.6 * 0.5 - 0.8, 0.6 * 0.25 + 1.6], rtol=1e-6)
    np.testing.assert_allclose(forward.from_x0_eps(x0, eps, "score", a, s), -eps / 0.8, rtol=1e-6)


def test_conversions_round_trip_on_the_flow_path():
    x0, eps = _random_x0_eps()
    t = jnp.linspace(0.01, 0.99, 64)
    x_t = forward.flow_interpolate(x0, eps, t)
    a, s = forward.expand_to(1 - t, x0), forward.expand_to(t, x0)
    for kind in ("velocity", "v", "eps", "x0"):
        prediction = forward.from_x0_eps(x0, eps, kind, a, s)
        x0_back, eps_back = forward.to_x0_eps(prediction, kind, x_t, a, s)
        np.testing.assert_allclose(x0_back, x0, atol=1e-4)
        np.testing.assert_allclose(eps_back, eps, atol=1e-4)
    u = forward.from_x0_eps(x0, eps, "velocity", a, s)
    np.testing.assert_allclose(forward.convert(u, "velocity", "eps", x_t, a, s), eps, atol=1e-4)


def test_flow_velocity_is_the_time_derivative_of_the_path():
    x0, eps = _random_x0_eps((4, 3))
    t, h = 0.3, 1e-3
    finite_difference = (forward.flow_interpolate(x0, eps, t + h) - forward.flow_interpolate(x0, eps, t - h)) / (2 * h)
    np.testing.assert_allclose(finite_difference, forward.flow_velocity(x0, eps), atol=1e-3)
    np.testing.assert_allclose(forward.flow_interpolate(x0, eps, 0.0), x0)
    np.testing.assert_allclose(forward.flow_interpolate(x0, eps, 1.0), eps)


def test_unknown_parameterization_lists_the_valid_ones():
    with pytest.raises(ValueError, match="eps, x0, v, score, velocity"):
        forward.to_x0_eps(jnp.zeros(2), "noise", jnp.zeros(2), 1.0, 1.0)
