"""Classifier-free guidance, img2img, inpainting (with RePaint) and DDIM inversion, on the exact mixture denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import editing, metrics, mixture, samplers
from diffusion.guidance import classifier_free_guidance, rescale_guidance
from diffusion.samplers import sample
from diffusion.schedules import Schedule

SCHEDULE = Schedule("linear", 1000)
RING = mixture.ring_mixture()  # 8 modes, classes 0, 1, 0, 1, ... around the circle
NULL = RING.num_classes  # the unconditional label
EPS = mixture.exact_denoiser(RING, SCHEDULE, "eps")


def _class_one_share(x):
    return float(metrics.mode_weights(x, RING)[1::2].sum())


# --- Classifier-free guidance ---------------------------------------------------------------


def test_guidance_is_the_affine_combination_in_one_batched_call():
    x = jax.random.normal(jax.random.key(0), (16, 2))
    t = jnp.full((16,), 400.0)
    cond = jnp.arange(16) % 2
    batches = []

    def counting(x, t, cond):
        batches.append(x.shape[0])
        return EPS(x, t, cond)

    guided = jax.jit(classifier_free_guidance(counting, 3.0, NULL))(x, t, cond)
    assert batches == [32]  # both branches in one network call
    eps = jax.jit(EPS)
    conditional, unconditional = eps(x, t, cond), eps(x, t, jnp.full((16,), NULL))
    np.testing.assert_allclose(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    for scale, expected in [(1.0, conditional), (0.0, unconditional)]:
        np.testing.assert_allclose(jax.jit(classifier_free_guidance(EPS, scale, NULL))(x, t, cond), expected, atol=1e-6)


def test_guidance_in_an_interval_is_the_conditional_prediction_outside_it():
    """Kynkäänniemi et al. 2024: the guided combination inside [low, high], the conditional model elsewhere."""
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([100.0, 300.0, 500.0, 700.0])
    cond = jnp.array([0, 1, 0, 1])
    eps = jax.jit(EPS)
    conditional, unconditional = eps(x, t, cond), eps(x, t, jnp.full((4,), NULL))
    guided = jax.jit(classifier_free_guidance(EPS, 3.0, NULL, interval=(300.0, 500.0)))(x, t, cond)
    inside = np.array([False, True, True, False])
    np.testing.assert_allclose(guided[inside], (unconditional + 3.0 * (conditional - unconditional))[inside], atol=1e-5)
    np.testing.assert_allclose(guided[~inside], conditional[~inside], atol=1e-6)

    executed = []  # batch sizes of the network calls that run (not just traced)

    def counting(x, t, cond):
        jax.debug.callback(lambda x: executed.append(len(x)), x)
        return EPS(x, t, cond)

    outside = jax.jit(classifier_free_guidance(counting, 3.0, NULL, interval=(300.0, 500.0)))
    np.testing.assert_allclose(outside(x, jnp.full((4,), 700.0), cond), eps(x, jnp.full((4,), 700.0), cond), atol=1e-6)
    jax.effects_barrier()
    assert executed == [4]  # outside the interval: the conditional batch alone
    outside(x, t, cond)
    jax.effects_barrier()
    assert executed == [4, 8]  # some inside: both branches
    with pytest.raises(ValueError, match=r"two times \(low, high\) with low <= high"):
        classifier_free_guidance(EPS, 3.0, NULL, interval=(500.0, 300.0))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun"])
def test_guidance_in_an_interval_is_decided_per_step(sampler):
    """Point masses make every step exact: the data is a point per label, x0_hat is that point, and a DDIM,
    Euler or Heun step carries x_t exactly along its straight path to the point -- provided all of the step's
    network calls see the same field. Heun's corrector at the next level must be guided exactly when the step is
    (Kynkäänniemi et al. 2024's sampler decides per step), whatever the corrector's own time."""
    points = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # labels 0, 1 and NULL (= 2)
    scale = 3.0
    denoiser = lambda x, t, cond: jnp.broadcast_to(points[cond], x.shape)  # noqa: E731 (an x0-prediction)
    plan = samplers.make_plan(sampler, schedule=SCHEDULE, steps=8, parameterization="x0")
    t = np.asarray(plan.grid.timesteps)
    interval = (t[4] - 0.5, t[2] + 0.5)  # steps 2, 3, 4; Heun's correctors of steps 1 and 4 run at t[2] and t[5]
    guided = classifier_free_guidance(denoiser, scale, NULL, interval=interval)
    cond = jnp.array([0, 1])
    x_T = jax.random.normal(jax.random.key(3), (2, 2))
    xs = samplers.run(plan, guided, x_T, cond=cond, return_trajectory=True).xs

    signal, noise = (np.asarray(v, np.float64) for v in plan.family.scales(plan.grid))
    x = np.asarray(x_T, np.float64)
    for k in range(plan.steps):
        target = np.asarray(points[NULL] + (scale if 2 <= k <= 4 else 1.0) * (points[cond] - points[NULL]))
        assert np.allclose(xs[k], x, atol=1e-4), f"frame {k}"
        x = signal[k + 1] * target + noise[k + 1] * (x - signal[k] * target) / noise[k]
    np.testing.assert_allclose(xs[-1], x, atol=1e-4)


def test_guidance_rescale_matches_the_conditional_standard_deviation():
    conditional = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    guided = 5.0 * conditional + 1.0
    full = rescale_guidance(guided, conditional, 1.0)
    np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(conditional, axis=(1, 2, 3)), rtol=1e-5)
    half = rescale_guidance(guided, conditional, 0.5)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * guided, rtol=1e-5)


def test_negative_condition_moves_mass_away_from_its_class(report):
    x_T = jax.random.normal(jax.random.key(2), (1000, 2))
    settings = dict(sampler="ddim", schedule=SCHEDULE, steps=50, parameterization="eps")
    unconditional = sample(EPS, x_T, cond=jnp.full((1000,), NULL), **settings).x
    away_from_one = sample(classifier_free_guidance(EPS, 2.0, 1), x_T, cond=jnp.full((1000,), NULL), **settings).x
    report("negative condition", f"class-1 share: unguided {_class_one_share(unconditional):.3f}, negative=1 at scale 2 "
           f"{_class_one_share(away_from_one):.3f}")
    assert abs(_class_one_share(unconditional) - 0.5) < 0.05
    assert _class_one_share(away_from_one) < 0.4


def test_guidance_errors_are_clear():
    with pytest.raises(ValueError, match="finite number"):
        classifier_free_guidance(EPS, float("nan"), NULL)
    with pytest.raises(ValueError, match="rescale must be in"):
        classifier_free_guidance(EPS, 3.0, NULL, rescale=2.0)
    with pytest.raises(ValueError, match="needs a condition"):
        sample(classifier_free_guidance(EPS, 3.0, NULL), jnp.zeros((4, 2)), sampler="ddim", schedule=SCHEDULE, steps=5,
               parameterization="eps")


# --- img2img ---------------------------------------------------------------------------------

ZERO_SNR = Schedule("linear", 1000, zero_terminal_snr=True)
V = mixture.exact_denoiser(RING, ZERO_SNR, "v")
ZERO_SNR_SETTINGS = dict(sampler="ddim", schedule=ZERO_SNR, steps=10, parameterization="v", spacing="trailing")


def test_img2img_strength_zero_keeps_the_input_and_one_is_ordinary_sampling():
    x0, _ = mixture.sample(RING, jax.random.key(3), 256)
    noise = jax.random.normal(jax.random.key(4), (256, 2))
    kept = editing.img2img(V, x0, noise, strength=0.0, **ZERO_SNR_SETTINGS)
    assert kept.nfe == 0
    np.testing.assert_array_equal(kept.x, x0)
    # With zero terminal SNR the first level holds no trace of x0: strength 1 is sampling itself.
    fresh = editing.img2img(V, x0, noise, strength=1.0, **ZERO_SNR_SETTINGS)
    np.testing.assert_array_equal(fresh.x, sample(V, noise, **ZERO_SNR_SETTINGS).x)
    partial = editing.img2img(V, x0, noise, strength=0.35, **ZERO_SNR_SETTINGS)
    assert partial.nfe == 3  # int(10 * 0.35) of the 10 steps: the last three
    np.testing.assert_array_equal(partial.timesteps, [299, 199, 99])
    moved = lambda result: float(jnp.mean(jnp.linalg.norm(result.x - x0, axis=1)))  # noqa: E731
    assert moved(partial) < 0.5 * moved(fresh)


def test_img2img_works_in_sigma_space_and_rejects_bad_strength():
    x0, _ = mixture.sample(RING, jax.random.key(5), 256)
    noise = jax.random.normal(jax.random.key(6), (256, 2))
    result = editing.img2img(EPS, x0, noise, strength=0.2, sampler="euler", schedule=SCHEDULE, steps=20,
                             parameterization="eps", return_trajectory=True)
    assert result.nfe == 4
    sigma = result.sigmas[0]  # the start: x0 noised to that level, as the network sees it (VP scaling)
    np.testing.assert_allclose(result.xs[0], (x0 + sigma * noise) / np.sqrt(1 + sigma**2), rtol=1e-5, atol=1e-6)
    nearest_mode = lambda x: jnp.argmin(jnp.linalg.norm(x[:, None] - RING.means, axis=-1), axis=1)  # noqa: E731
    assert float(jnp.mean(nearest_mode(result.x) == nearest_mode(x0))) > 0.8  # a small edit keeps most modes
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            editing.img2img(EPS, x0, noise, strength=strength, sampler="euler", schedule=SCHEDULE, steps=20,
                            parameterization="eps")


# --- Inpainting ------------------------------------------------------------------------------

KNOWN = jnp.tile(jnp.array([[2.0, 9.0]]), (1000, 1))  # x = 2 is known; y (9 here) is to be generated
MASK = jnp.array([1.0, 0.0])  # 1 = known


@pytest.mark.parametrize("name", ["ddim", "euler", "flow_euler"])
def test_inpainting_keeps_the_known_region(name):
    flow = name.startswith("flow")
    x_T = jax.random.normal(jax.random.key(7), (1000, 2))
    result = editing.inpaint(
        mixture.exact_flow_velocity(RING) if flow else EPS, KNOWN, MASK, x_T, sampler=name, key=jax.random.key(8),
        schedule=None if flow else SCHEDULE, steps=30, parameterization="velocity" if flow else "eps",
    )
    np.testing.assert_array_equal(result.x[:, 0], KNOWN[:, 0])
    assert float(jnp.abs(result.x[:, 1]).max()) < 4.0  # generated inside the ring, not copied from x_known


def test_repaint_resampling_brings_the_generated_region_closer_to_the_true_conditional(report):
    # Given x = 2, the ring's only plausible mode is (2, 0): y should be near 0. Plain replacement
    # often commits to a neighbouring mode; RePaint's resampling harmonises the two regions.
    x_T = jax.random.normal(jax.random.key(9), (1000, 2))
    settings = dict(sampler="ddpm", key=jax.random.key(10), schedule=SCHEDULE, steps=50, parameterization="eps")
    near_zero = {}
    for resample in (1, 10):
        result = editing.inpaint(EPS, KNOWN, MASK, x_T, resample=resample, **settings)
        assert result.nfe == resample * 49 + 1
        np.testing.assert_array_equal(result.x[:, 0], KNOWN[:, 0])
        near_zero[resample] = float(jnp.mean(jnp.abs(result.x[:, 1]) < 0.5))
    report("RePaint", f"share of |y| < 0.5 given x = 2: replacement {near_zero[1]:.2f}, RePaint U=10 {near_zero[10]:.2f}")
    assert near_zero[10] > near_zero[1] + 0.15


def test_inpainting_errors_are_clear():
    x_T = jnp.zeros((1000, 2))
    settings = dict(sampler="ddim", key=jax.random.key(0), schedule=SCHEDULE, steps=10, parameterization="eps")
    with pytest.raises(ValueError, match="does not fit"):
        editing.inpaint(EPS, KNOWN, jnp.ones(3), x_T, **settings)
    with pytest.raises(ValueError, match="resample must be"):
        editing.inpaint(EPS, KNOWN, MASK, x_T, resample=0, **settings)
    with pytest.raises(ValueError, match="resample must be"):
        editing.inpaint(EPS, KNOWN, MASK, x_T, resample=True, **settings)
    with pytest.raises(ValueError, match="multistep"):
        editing.inpaint(EPS, KNOWN, MASK, x_T, resample=2, **{**settings, "sampler": "dpmpp_2m"})
    with pytest.raises(ValueError, match="pass key"):
        editing.inpaint(EPS, KNOWN, MASK, x_T, **{**settings, "key": None})


# --- DDIM inversion --------------------------------------------------------------------------


def test_ddim_inversion_then_sampling_returns_the_input(report):
    x0, _ = mixture.sample(RING, jax.random.key(11), 256)
    error = {}
    for steps in (20, 200):
        settings = dict(schedule=SCHEDULE, steps=steps, parameterization="eps")
        latent = editing.ddim_invert(EPS, x0, **settings)
        assert abs(float(jnp.std(latent.x)) - 1.0) < 0.3  # it is noise-like
        back = sample(EPS, latent.x, sampler="ddim", **settings).x
        error[steps] = float(jnp.sqrt(jnp.mean(jnp.sum((back - x0) ** 2, axis=1))))
    report("DDIM inversion", f"DDIM inversion round trip, RMS error: 20 steps {error[20]:.4f}, 200 steps {error[200]:.4f}")
    assert error[200] < 0.02 and error[200] < error[20] / 4
    with pytest.raises(ValueError, match="eta"):
        editing.ddim_invert(EPS, x0, schedule=SCHEDULE, steps=20, parameterization="eps", eta=0.5)
