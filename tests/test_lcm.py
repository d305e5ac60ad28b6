"""The LCM sampler and the consistency function, proven on the exact Gaussian mixture.

The exact denoiser gives the exact probability-flow ODE, so it gives a perfect consistency
function too: f(x_t, t) = the origin of the ODE trajectory through x_t (``mixture.ode_origin``,
RK4 in float64). Wrapped as an x0-prediction through c_skip / c_out
(``mixture.exact_consistency_model``), it must make the LCM sampler return the ODE's solution
(scipy's, independently) in one step and, in several, what an independent loop computes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import forward, metrics, mixture
from diffusion.errors import InputError
from diffusion.samplers import make_plan, sample
from diffusion.schedules import Schedule, lcm_timesteps, origin_timesteps

SCHEDULE = Schedule("linear", 1000)
RING = mixture.ring_mixture()


def test_lcm_timesteps_are_the_lcm_schedulers():
    np.testing.assert_array_equal(origin_timesteps(1000, 50)[:3], [19, 39, 59])
    assert origin_timesteps(1000, 50)[-1] == 999
    np.testing.assert_array_equal(lcm_timesteps(SCHEDULE, 4), [999, 759, 499, 259])
    np.testing.assert_array_equal(lcm_timesteps(SCHEDULE, 1), [999])
    np.testing.assert_array_equal(lcm_timesteps(SCHEDULE, 2), [999, 499])
    eight = [999, 879, 749, 629, 499, 379, 249, 129]
    np.testing.assert_array_equal(lcm_timesteps(SCHEDULE, 8, origin_steps=100), eight)
    plan = make_plan("lcm", schedule=SCHEDULE, steps=4, parameterization="x0")
    assert plan.nfe == 4 and plan.grid.alpha_bar[-1] == 1.0


def test_the_boundary_condition_holds_exactly_at_t_zero():
    c_skip, c_out = forward.boundary_scalings(jnp.asarray([0.0, 1.0, 259.0]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    x = jax.random.normal(jax.random.key(0), (16, 2))
    anything = 1e6 * jax.random.normal(jax.random.key(1), (16, 2))
    assert np.array_equal(forward.consistency_function(anything, x, 0), x)  # f(x, 0) = x, whatever the network says
    assert float(c_out[2]) > 0.999  # far from 0 the consistency function is the network's x0_hat
    np.testing.assert_allclose(c_skip[1], 0.25 / (100 + 0.25))  # timestep_scaling 10, sigma_data 0.5


def test_one_lcm_step_with_a_perfect_consistency_function_is_the_ode_solution():
    with jax.enable_x64(True):
        ring = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, RING)
        x_T = jax.random.normal(jax.random.key(0), (32, 2), jnp.float64)
        result = sample(mixture.exact_consistency_model(ring, SCHEDULE), x_T, sampler="lcm", schedule=SCHEDULE, steps=1,
                        parameterization="x0", key=jax.random.key(1))
        assert result.nfe == 1 and result.x.dtype == jnp.float64
        # The independent reference: scipy's adaptive solver from the schedule's last timestep (test_samplers).
        from tests.test_samplers import _probability_flow_solution

        np.testing.assert_allclose(result.x, _probability_flow_solution(np.asarray(x_T)), atol=1e-6)


def test_lcm_multistep_with_a_perfect_consistency_function_matches_a_reference_loop():
    with jax.enable_x64(True):
        ring = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, RING)
        x_T = jax.random.normal(jax.random.key(2), (32, 2), jnp.float64)
        key = jax.random.key(3)
        result = sample(mixture.exact_consistency_model(ring, SCHEDULE), x_T, sampler="lcm", schedule=SCHEDULE, steps=4,
                        parameterization="x0", key=key, return_trajectory=True)
        # Luo et al. 2023, Alg. 3, written out: origin, then noise to the next timestep, from the same per-step keys.
        timesteps = [999, 759, 499, 259]
        x = x_T
        for i, t in enumerate(timesteps):
            origin = mixture.ode_origin(ring, SCHEDULE, x, t)
            if i + 1 < len(timesteps):
                alpha_bar = SCHEDULE.alpha_bar[timesteps[i + 1]]
                noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                x = np.sqrt(alpha_bar) * origin + np.sqrt(1 - alpha_bar) * noise
        np.testing.assert_allclose(result.x, origin, atol=1e-6)
        np.testing.assert_array_equal(result.timesteps, timesteps)


def test_lcm_with_a_perfect_consistency_function_draws_the_mixture():
    with jax.enable_x64(True):
        ring = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, RING)
        x_T = jax.random.normal(jax.random.key(4), (1000, 2), jnp.float64)
        truth, _ = mixture.sample(ring, jax.random.key(5), 1000)
        baseline, _ = mixture.sample(ring, jax.random.key(6), 1000)
        floor = metrics.sliced_wasserstein(baseline, truth)
        for steps in (1, 4):
            x = sample(mixture.exact_consistency_model(ring, SCHEDULE), x_T, sampler="lcm", schedule=SCHEDULE,
                       steps=steps, parameterization="x0", key=jax.random.key(7)).x
            assert metrics.sliced_wasserstein(x, truth) < 2 * floor + 0.02, steps


@pytest.mark.parametrize("change, message", [
    (dict(steps=51), "takes 1 to 50 steps"),
    (dict(spacing="trailing"), "lcm takes spacing lcm"),
    (dict(sampler="ddim", origin_steps=25), "origin_steps applies to the lcm sampler only"),
    (dict(origin_steps=2000), "origin_steps must be a whole number"),
])
def test_bad_lcm_settings_are_one_clear_error(change, message):
    settings = dict(sampler="lcm", schedule=SCHEDULE, steps=4, parameterization="x0")
    settings.update(change)
    with pytest.raises(InputError, match=message):
        make_plan(settings.pop("sampler"), **settings)
