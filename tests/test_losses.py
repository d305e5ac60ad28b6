"""The objectives: eps / x0 / v targets, min-SNR weighting, flow matching and its time distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import forward, losses
from diffusion.schedules import Schedule

SCHEDULE = Schedule("linear", 1000)


def oracle(x0, kind, schedule=SCHEDULE):
    """A 'model' that knows x0, so its prediction is exactly the target: the loss must be ~0."""

    def model(x_t, t, cond):
        a, s = forward.vp_scales(schedule, t.astype(jnp.int32), x_t)
        return forward.from_x0_eps(x0, (x_t - a * x0) / s, kind, a, s)

    return model


def zero_model(x_t, t, cond):
    return jnp.zeros_like(x_t)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_denoising_loss_targets(kind):
    """The oracle scores 0; predicting 0 scores E[target^2], which is known in closed form for x0 = 0 data."""
    key = jax.random.key(0)
    x0 = jax.random.uniform(jax.random.key(1), (256, 4, 4, 1), minval=-1, maxval=1)
    assert (
        float(losses.denoising_loss(oracle(x0, kind), x0, None, key, schedule=SCHEDULE, parameterization=kind)) < 1e-8
    )

    x0 = jnp.zeros((4096, 2, 2, 1))
    loss = float(losses.denoising_loss(zero_model, x0, None, key, schedule=SCHEDULE, parameterization=kind))
    # With x0 = 0: eps -> E[eps^2] = 1; x0 -> 0; v = a eps - s x0 -> E[alpha_bar_t] over uniform t.
    expected = {"eps": 1.0, "x0": 0.0, "v": float(np.mean(SCHEDULE.alpha_bar))}[kind]
    assert abs(loss - expected) < 0.03


def test_min_snr_weight_values_and_consistency():
    snr = jnp.array([0.5, 5.0, 50.0])
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "x0"), [0.5, 5.0, 5.0])
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "eps"), [1.0, 1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "v"), [0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0], rtol=1e-6)

    # The same mistake in x0, expressed as each parameterization and weighted, costs min(SNR, gamma) * |x0 error|^2.
    t = jnp.array([10, 300, 900])
    x_t, x0 = jax.random.normal(jax.random.key(0), (3, 8)), jax.random.normal(jax.random.key(1), (3, 8))
    x0_wrong = x0 + 0.3 * jax.random.normal(jax.random.key(2), (3, 8))
    a, s = forward.vp_scales(SCHEDULE, t, x_t)
    snr = jnp.asarray(SCHEDULE.snr, jnp.float32)[t]
    expected = jnp.minimum(snr, 5.0) * jnp.mean((x0_wrong - x0) ** 2, axis=1)
    for kind in ("eps", "x0", "v"):
        right, wrong = (forward.convert(x, "x0", kind, x_t, a, s) for x in (x0, x0_wrong))
        weighted = losses.min_snr_weight(snr, 5.0, kind) * jnp.mean((wrong - right) ** 2, axis=1)
        np.testing.assert_allclose(weighted, expected, rtol=2e-4)
    with pytest.raises(ValueError, match="eps, x0 and v"):
        losses.min_snr_weight(snr, 5.0, "velocity")


def test_flow_matching_loss():
    key = jax.random.key(0)
    x0 = jax.random.uniform(jax.random.key(1), (256, 4, 4, 1), minval=-1, maxval=1)

    def oracle_velocity(x_t, t, cond):  # on the straight path, eps - x0 = (x_t - x0) / t
        return (x_t - x0) / forward.expand_to(t, x_t)

    assert float(losses.flow_matching_loss(oracle_velocity, x0, None, key)) < 1e-8
    # Predicting 0 for x0 = 0 data costs E[eps^2] = 1.
    assert abs(float(losses.flow_matching_loss(zero_model, jnp.zeros((4096, 2, 2, 1)), None, key)) - 1.0) < 0.03


def test_logit_normal_times():
    t = np.asarray(losses.logit_normal_times(jax.random.key(0), 20_000, mean=0.5, std=0.8))
    assert t.min() > 0 and t.max() < 1
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
