"""The samplers, proven with the exact Gaussian-mixture denoiser: no network, so what is left is the sampler.

- order of accuracy: from the same x_T every deterministic sampler converges to
  the probability-flow ODE solution (scipy, float64), at order 1 or 2;
- distributions: long or good samplers reproduce the mixture, 5 steps do not;
- the conventions of the common implementations (grids, NFE, PLMS's warm-up);
- determinism, scan == Python loop, trajectories, compile caching, bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from diffusion import forward, metrics, mixture, samplers
from diffusion.samplers import make_plan, sample
from diffusion.schedules import Schedule, timestep_at

SCHEDULE = Schedule("linear", 1000)
RING = mixture.ring_mixture()
EPS = mixture.exact_denoiser(RING, SCHEDULE, "eps")  # module level: one compile per setting, shared by the tests
X0 = mixture.exact_denoiser(RING, SCHEDULE, "x0")
VELOCITY = mixture.exact_flow_velocity(RING)


def _run(name, x_T, steps, denoiser=None, **kw):
    """Sample with the exact denoiser of the family of ``name``."""
    if name.startswith("flow"):
        return sample(denoiser or VELOCITY, x_T, sampler=name, steps=steps, parameterization="velocity", **kw)
    return sample(denoiser or EPS, x_T, sampler=name, schedule=SCHEDULE, steps=steps, parameterization="eps", **kw)


# --- Order of accuracy ------------------------------------------------------------------------

ORDER_STEPS = (128, 256, 512)
ORDERS = {  # sampler, extra settings, expected order
    "euler": ({"sigma_max": None}, 1),  # sigma-space samplers from the reference's start, the schedule's T - 1
    "ddim": ({"spacing": "linspace"}, 1),
    "heun": ({"sigma_max": None}, 2),
    "dpmpp_2m": ({"sigma_max": None}, 2),
    "dpmpp_2m_karras": ({"sigma_max": None}, 2),
    # UniPC on Karras sigmas: on linspace the last steps (sigma 0.01 to 0.03 on this schedule) stay about half a
    # unit of lambda long until N approaches T, so the asymptotic order shows only later (2.2 at N = 128-512).
    "unipc": ({"sigma_max": None, "spacing": "karras"}, 3),
    "unipc bh1": ({"sigma_max": None, "spacing": "karras", "variant": "bh1"}, 3),
    "dpmpp_sde": ({"sigma_max": None, "eta": 0.0}, 2),  # without its noise: DPM-Solver++(2S)
    "flow_euler": ({}, 1),
    "flow_heun": ({}, 2),
}


def _float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _probability_flow_solution(x_T):
    """Where the diffusion samplers converge: the ODE dx/d log(sigma) = x - x0_hat in sigma space, solved
    with scipy from sigma_max to sigma_min (the schedule's t = T - 1 and t = 0), then the final jump to
    sigma = 0 that every sampler makes there: x = x0_hat(x, sigma_min)."""
    ring = _float64(RING)

    @jax.jit
    def denoised(x, sigma):
        a = 1.0 / jnp.sqrt(1.0 + sigma**2)
        return mixture.posterior_mean(ring, x * a, a, sigma * a)

    sigma_max, sigma_min = SCHEDULE.sigmas[-1], SCHEDULE.sigmas[0]
    shape = x_T.shape
    solution = scipy.integrate.solve_ivp(
        lambda u, y: np.ravel(y.reshape(shape) - denoised(y.reshape(shape), np.exp(u))),
        (np.log(sigma_max), np.log(sigma_min)),
        np.ravel(x_T * np.sqrt(1.0 + sigma_max**2)),
        method="DOP853", rtol=1e-10, atol=1e-10,
    )
    return np.asarray(denoised(solution.y[:, -1].reshape(shape), sigma_min))


def _flow_solution(x_T, t_end=1e-6):
    """The rectified-flow ODE dx/dt = (x - x0_hat) / t from t = 1 to t_end, then x0_hat there (= x(0) + O(t_end^2))."""
    ring = _float64(RING)

    @jax.jit
    def x0_hat(x, t):
        return mixture.posterior_mean(ring, x, 1.0 - t, t)

    shape = x_T.shape
    solution = scipy.integrate.solve_ivp(
        lambda t, y: np.ravel((y.reshape(shape) - x0_hat(y.reshape(shape), t)) / t),
        (1.0, t_end), np.ravel(x_T), method="DOP853", rtol=1e-10, atol=1e-10,
    )
    return np.asarray(x0_hat(solution.y[:, -1].reshape(shape), t_end))


def test_deterministic_samplers_converge_to_the_ode_solution_at_their_order(report):
    with jax.enable_x64(True):
        x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2), jnp.float64))
        reference = {"diffusion": _probability_flow_solution(x_T), "flow": _flow_solution(x_T)}
        rows, failures = [], []
        for name, (settings, expected) in ORDERS.items():
            flow = name.startswith("flow")
            target = reference["flow" if flow else "diffusion"]
            errors = []
            for steps in ORDER_STEPS:
                denoiser = VELOCITY if flow else X0
                kind = "velocity" if flow else "x0"
                result = sample(
                    denoiser, jnp.asarray(x_T), sampler=name.split()[0], schedule=None if flow else SCHEDULE,
                    steps=steps, parameterization=kind, **settings,
                )
                assert result.x.dtype == jnp.float64
                errors.append(np.sqrt(np.mean(np.sum((np.asarray(result.x) - target) ** 2, axis=1))))
            order = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
            rows.append(f"{name:16s} " + " ".join(f"{e:9.2e}" for e in errors) + f"   {order:5.2f}   {expected}")
            if not {1: 0.9 <= order <= 1.15, 2: 1.8 <= order <= 2.2, 3: 2.6 <= order <= 3.3}[expected]:
                failures.append(f"{name}: observed order {order:.2f}, expected about {expected}")
    header = f"{'sampler':16s} " + " ".join(f"{'N=' + str(n):>9s}" for n in ORDER_STEPS) + "   order   expected"
    report("orders of accuracy: RMS error against the ODE solution (float64, 64 particles, 8-Gaussian ring)",
           "\n".join([header, *rows]))
    assert not failures, failures


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m_and_its_noise_keeps_the_marginals():
    x_T = jax.random.normal(jax.random.key(8), (64, 2))
    ode = _run("dpmpp_2m_karras", x_T, 12)
    np.testing.assert_allclose(_run("dpmpp_2m_sde_karras", x_T, 12, eta=0.0).x, ode.x, rtol=1e-5, atol=1e-5)
    # Data at a point mass m: x0_hat = m is exact at every level, so one SDE step must carry x ~ N(m, sigma^2)
    # to N(m, sigma_next^2) exactly: the move towards D must complement the shrinking (the mean), and the
    # shrinking and the fresh noise must add up (the spread).
    n, sigma, sigma_next = 200_000, 3.0, 1.0
    m = jnp.broadcast_to(jnp.asarray([2.0, -1.0]), (n, 2))
    grid = samplers.SigmaGrid(jnp.asarray([0.0]), jnp.asarray([sigma, sigma_next]))
    x = m + sigma * jax.random.normal(jax.random.key(9), (n, 2))
    slope = lambda x, s: ((x - m) / s, m)  # noqa: E731
    (x_next, _), _ = samplers.dpmpp_2m_sde_step(slope, grid, (x, jnp.zeros((1, n, 2))), 0, jax.random.key(10))
    np.testing.assert_allclose(np.mean(x_next, axis=0), [2.0, -1.0], atol=0.01)
    np.testing.assert_allclose(np.std(x_next, axis=0), sigma_next, rtol=0.01)


def test_dpmpp_sde_keeps_the_marginals_and_its_two_noises_are_one_brownian_path():
    # Point-mass data, as above: the midpoint's x0_hat is m whatever its noise, and the step must carry
    # N(m, sigma^2) to N(m, sigma_next^2).
    n, sigma, sigma_next = 200_000, 3.0, 1.0
    m = jnp.broadcast_to(jnp.asarray([2.0, -1.0]), (n, 2))
    grid = samplers.SigmaGrid(jnp.asarray([0.0, 0.0]), jnp.asarray([sigma, sigma_next, 0.0]))
    x = m + sigma * jax.random.normal(jax.random.key(11), (n, 2))
    slope = lambda x, s: ((x - m) / s, m)  # noqa: E731
    (x_next, _), _ = samplers.dpmpp_sde_step(slope, grid, (x, None), 0, jax.random.key(12))
    np.testing.assert_allclose(np.mean(x_next, axis=0), [2.0, -1.0], atol=0.01)
    np.testing.assert_allclose(np.std(x_next, axis=0), sigma_next, rtol=0.01)
    # The noises at the midpoint and at the end: increments of one Brownian motion from sigma, so their
    # correlation is sqrt((sigma - sigma_mid) / (sigma - sigma_next)) (0.85 here), each of variance 1.
    sigma_mid = np.sqrt(sigma * sigma_next)
    first, second = samplers._brownian_noise(jax.random.key(13), x, sigma, sigma_mid, sigma_next)
    np.testing.assert_allclose([np.var(first), np.var(second)], 1.0, rtol=0.01)
    expected = np.sqrt((sigma - sigma_mid) / (sigma - sigma_next))
    np.testing.assert_allclose(np.mean(first * second), expected, atol=0.01)
    # Which noise goes where: data N(0, 1), whose x0_hat = x / (1 + sigma^2) makes the end depend on the
    # midpoint's noise too; the step replayed by hand from the same two noises.
    gaussian = lambda x, s: ((x - x / (1 + s**2)) / s, x / (1 + s**2))  # noqa: E731
    key = jax.random.key(14)
    (x_next, _), _ = samplers.dpmpp_sde_step(gaussian, grid, (x, None), 0, key)
    noise_mid, noise = samplers._brownian_noise(key, x, sigma, sigma_mid, sigma_next)
    down, up = samplers._ancestral_split(sigma, sigma_mid, 1.0)
    x_mid = down / sigma * x + (1 - down / sigma) * x / (1 + sigma**2) + up * noise_mid
    down, up = samplers._ancestral_split(sigma, sigma_next, 1.0)
    by_hand = down / sigma * x + (1 - down / sigma) * x_mid / (1 + sigma_mid**2) + up * noise
    np.testing.assert_allclose(x_next, by_hand, rtol=1e-5, atol=1e-5)


def test_euler_is_ddim_in_sigma_space():
    # On the same grid (all T integer timesteps), DDIM's update sqrt(ab') x0 + sqrt(1 - ab') eps is
    # exactly an Euler step of dx/dsigma = (x - x0_hat) / sigma for x = x_t / sqrt(alpha_bar).
    schedule = Schedule("linear", 50)
    denoiser = mixture.exact_denoiser(RING, schedule, "eps")
    x_T = jax.random.normal(jax.random.key(1), (64, 2))
    settings = dict(schedule=schedule, steps=50, parameterization="eps", spacing="linspace")
    ddim = sample(denoiser, x_T, sampler="ddim", **settings)
    euler = sample(denoiser, x_T, sampler="euler", **settings)
    np.testing.assert_allclose(euler.x, ddim.x, atol=2e-4)


# --- Distributions --------------------------------------------------------------------------

SW_TOLERANCE = 0.1  # sliced W1 to 2000 true samples; two true sets of 2000 differ by 0.03-0.09 (6 seeds)
WEIGHT_TOLERANCE = 0.03  # per mode, about 4 standard errors at n = 2000 (true weight 1/8)


def test_long_and_good_samplers_reproduce_the_mixture_and_5_steps_do_not(report):
    n = 2000
    x_T = jax.random.normal(jax.random.key(2), (n, 2))
    truth, _ = mixture.sample(RING, jax.random.key(3), n)
    distance = {}
    cases = [("ddpm", 1000), ("dpmpp_2m", 20), ("euler_a", 50), ("dpmpp_2m_sde", 25), ("dpmpp_sde_karras", 10)]
    for name, steps in cases + [("dpmpp_2m", 5)]:
        x = _run(name, x_T, steps, key=jax.random.key(5)).x
        distance[name, steps] = metrics.sliced_wasserstein(x, truth)
        weights = metrics.mode_weights(x, RING)
        if steps > 5:
            assert distance[name, steps] < SW_TOLERANCE, (name, steps, distance)
            np.testing.assert_allclose(weights, 1 / 8, atol=WEIGHT_TOLERANCE, err_msg=f"{name} {steps}")
        assert np.all(weights > 0.05), f"{name} {steps}: a mode is missing: {weights}"
    report("sliced W1 to the true mixture (sampler, steps)", str({f"{k[0]} {k[1]}": round(v, 3) for k, v in distance.items()}))
    assert distance["dpmpp_2m", 5] > 3 * distance["dpmpp_2m", 20]


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_zero_terminal_snr_with_v_prediction_and_trailing_spacing(name):
    schedule = Schedule("linear", 1000, zero_terminal_snr=True)
    denoiser = mixture.exact_denoiser(RING, schedule, "v")
    x_T = jax.random.normal(jax.random.key(6), (1000, 2))
    result = sample(
        denoiser, x_T, sampler=name, schedule=schedule, steps=50, parameterization="v", spacing="trailing",
        key=jax.random.key(7),
    )
    assert result.timesteps[0] == 999 and result.sigmas[0] == np.inf
    truth, _ = mixture.sample(RING, jax.random.key(8), 1000)
    assert metrics.sliced_wasserstein(result.x, truth) < SW_TOLERANCE
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        make_plan(name, schedule=schedule, steps=50, parameterization="eps", spacing="trailing")


# --- Conventions of the widely used implementations ---------------------------------------------


def test_grids_and_nfe_follow_the_common_implementations():
    plan = lambda name, **kw: make_plan(name, schedule=SCHEDULE, steps=10, parameterization="eps", **kw)  # noqa: E731
    ddim = plan("ddim")
    np.testing.assert_array_equal(ddim.grid.timesteps, np.arange(900, -1, -100))  # leading
    assert ddim.grid.alpha_bar[-1] == 1.0  # "set alpha to one"
    np.testing.assert_array_equal(plan("ddim", offset=1).grid.timesteps, np.arange(901, 0, -100))
    np.testing.assert_array_equal(plan("ddim", spacing="trailing").grid.timesteps, np.arange(999, 0, -100))
    euler = plan("euler", sigma_max=None)  # k-diffusion: sigma at linspace(T - 1, 0, N) (fractional), then 0
    np.testing.assert_allclose(euler.grid.timesteps, np.linspace(999, 0, 10), atol=1e-3)
    np.testing.assert_allclose(euler.grid.sigmas[[0, -2]], SCHEDULE.sigmas[[-1, 0]], rtol=1e-6)
    assert euler.grid.sigmas[-1] == 0
    # By default sigma-space grids start at EDM's sigma_max = 80 (this linear schedule ends at 157).
    assert SCHEDULE.sigmas[-1] > 150
    top = float(timestep_at(SCHEDULE, 80.0))
    np.testing.assert_allclose(plan("euler").grid.timesteps, np.linspace(top, 0, 10), atol=1e-3)
    np.testing.assert_allclose(plan("euler").grid.sigmas[0], 80.0, rtol=1e-4)
    np.testing.assert_allclose(plan("dpmpp_2m_karras").grid.sigmas[0], 80.0, rtol=1e-4)
    np.testing.assert_array_equal(plan("euler", spacing="trailing").grid.sigmas, plan("euler", spacing="trailing",
                                  sigma_max=None).grid.sigmas)  # integer spacings keep the schedule's timesteps
    with pytest.raises(ValueError, match="sigma_max must be > 0"):
        plan("heun", sigma_max=0.0)
    karras = plan("dpmpp_2m_karras").grid.sigmas
    rho = 7.0
    ramp = (karras[:-1] ** (1 / rho) - karras[0] ** (1 / rho)) / (karras[-2] ** (1 / rho) - karras[0] ** (1 / rho))
    np.testing.assert_allclose(ramp, np.linspace(0, 1, 10), atol=1e-12)  # Karras et al. eq. 5
    flow = make_plan("flow_euler", schedule=None, steps=4, parameterization="velocity", shift=3.0)
    np.testing.assert_allclose(flow.grid.sigmas, [1.0, 0.9, 0.75, 0.5, 0.0])  # 3t / (1 + 2t)
    nfe = {name: plan(name).nfe for name in samplers.SAMPLERS if not name.startswith("flow")}
    assert nfe == dict(
        ddpm=10, ddim=10, plms=11, lcm=10, euler=10, euler_a=10, heun=19, dpmpp_2m=10, dpmpp_2m_karras=10,
        unipc=10, dpmpp_sde=19, dpmpp_sde_karras=19, dpmpp_2m_sde=10, dpmpp_2m_sde_karras=10,
    )
    assert make_plan("flow_heun", schedule=None, steps=10, parameterization="velocity").nfe == 19


def _reference_plms(eps_model, schedule, x, steps, offset):
    """PLMS as the widely used PNDM scheduler with "skip PRK steps" runs it: a counter-driven loop over
    the timesteps [t0, t1, t1, t2, ...], written independently of diffusion.samplers, in float64."""
    ratio = schedule.num_timesteps // steps
    ts = np.arange(steps) * ratio + offset
    plms_ts = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    alpha_bar = lambda t: schedule.alpha_bar[t] if t >= 0 else 1.0  # noqa: E731
    ets, saved, x = [], None, np.asarray(x, np.float64)
    for counter, t in enumerate(plms_ts):
        e = np.asarray(eps_model(x, t), np.float64)
        prev = t - ratio
        if counter != 1:
            ets = ets[-3:] + [e]
        else:
            prev, t = t, t + ratio
        if len(ets) == 1 and counter == 0:
            saved = x
        elif len(ets) == 1 and counter == 1:
            e, x = (e + ets[-1]) / 2, saved
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        a, a_prev = alpha_bar(t), alpha_bar(prev)
        denominator = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
        x = np.sqrt(a_prev / a) * x - (a_prev - a) * e / denominator
    return x


def test_plms_matches_the_pndm_scheduler_loop():
    x_T = jax.random.normal(jax.random.key(10), (64, 2))
    eps_model = jax.jit(lambda x, t: EPS(jnp.asarray(x, jnp.float32), jnp.full((64,), t, jnp.float32), None))
    expected = _reference_plms(eps_model, SCHEDULE, x_T, steps=10, offset=1)
    result = _run("plms", x_T, 10, offset=1)
    assert result.nfe == 11
    np.testing.assert_allclose(result.x, expected, atol=2e-4)


def _reference_unipc(x0_model, sigmas, x, variant):
    """UniPC-2 as the official code and diffusers' UniPCMultistepScheduler run it, in float64 NumPy: the corrector
    recomputes x_i from the last corrected sample with the 2 x 2 system solved by np.linalg.solve, written
    independently of diffusion.samplers (which applies the correction as an increment)."""
    lam = -np.log(sigmas[:-1])
    x, last, models = np.asarray(x, np.float64), None, []
    for i in range(len(sigmas) - 1):
        m = np.asarray(x0_model(x, sigmas[i]), np.float64)
        if i > 0:  # UniC, of the order the predictor had on step i - 1
            h = lam[i] - lam[i - 1]
            B = np.expm1(-h) if variant == "bh2" else -h
            base = sigmas[i] / sigmas[i - 1] * last - np.expm1(-h) * models[-1]
            if i == 1:
                x = base - B * 0.5 * (m - models[-1])
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                phi2 = np.expm1(-h) / -h - 1
                b = np.array([phi2 / B, 2 * (phi2 / -h - 0.5) / B])
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
                d1 = (models[-2] - models[-1]) / rk
                x = base - B * (rho[0] * d1 + rho[1] * (m - models[-1]))
        models, last = models[-1:] + [m], x
        if sigmas[i + 1] == 0:
            x = m
            continue
        h = np.log(sigmas[i] / sigmas[i + 1])
        B = np.expm1(-h) if variant == "bh2" else -h
        x = sigmas[i + 1] / sigmas[i] * x - np.expm1(-h) * m
        if i > 0:  # UniP-2 with rho = 1/2
            rk = (lam[i - 1] - lam[i]) / h
            x = x - B * 0.5 * (models[-2] - m) / rk
    return x


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_unipc_matches_the_reference_loop_and_its_corrector_matters(variant):
    x_T = jax.random.normal(jax.random.key(11), (64, 2))
    plan = make_plan("unipc", schedule=SCHEDULE, steps=10, parameterization="x0", variant=variant)
    sigmas = np.asarray(plan.grid.sigmas)

    @jax.jit
    def x0_model(x, sigma):
        t = jnp.full((64,), timestep_at(SCHEDULE, sigma), jnp.float32)
        return X0(jnp.asarray(x, jnp.float32) / jnp.sqrt(1.0 + sigma**2), t, None)

    expected = _reference_unipc(x0_model, sigmas, x_T * np.sqrt(1.0 + sigmas[0] ** 2), variant)
    result = sample(X0, x_T, sampler="unipc", schedule=SCHEDULE, steps=10, parameterization="x0", variant=variant)
    assert result.nfe == 10
    np.testing.assert_allclose(result.x, expected, atol=2e-4)
    if variant == "bh2":  # the corrector is what sets UniPC apart from DPM++ 2M here
        dpmpp = sample(X0, x_T, sampler="dpmpp_2m", schedule=SCHEDULE, steps=10, parameterization="x0")
        assert float(jnp.abs(dpmpp.x - result.x).max()) > 1e-2


def test_ddim_with_eta_one_is_ddpm_and_ddpm_uses_the_posterior_of_ho_et_al():
    # DDIM's sigma_t at eta = 1 is DDPM's posterior standard deviation (Song et al. 2021, Sec. 4.1), and
    # both draw noise from fold_in(key, i): same key, same samples.
    x_T = jax.random.normal(jax.random.key(16), (64, 2))
    key = jax.random.key(17)
    ddim = _run("ddim", x_T, 8, key=key, eta=1.0, return_trajectory=True)
    ddpm = _run("ddpm", x_T, 8, key=key, return_trajectory=True)
    np.testing.assert_allclose(ddim.xs, ddpm.xs, atol=2e-4)
    # One full-schedule step against forward.posterior_mean_variance (Ho et al. eq. 6-7).
    x_t = jax.random.normal(jax.random.key(13), (8, 2))
    x0 = jax.random.normal(jax.random.key(14), (8, 2))
    grid = samplers.VPGrid(jnp.asarray([500.0, 499.0]), jnp.asarray(SCHEDULE.alpha_bar[[500, 499]].tolist() + [1.0]))
    z = jax.random.normal(jax.random.key(15), (8, 2))
    (x_prev, _), _ = samplers.ddpm_step(lambda x, t, ab: (x0, None), grid, (x_t, None), 0, jax.random.key(15))
    mean, variance = forward.posterior_mean_variance(SCHEDULE, x0, x_t, 500)
    np.testing.assert_allclose(x_prev, mean + jnp.sqrt(variance) * z, rtol=1e-5, atol=1e-5)


# --- Determinism, loop forms, trajectories, compilation ---------------------------------------

LOOP_CASES = [
    ("ddpm", {}), ("plms", {}), ("heun", {"churn": 1.0}), ("unipc", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde_karras", {}),
]


@pytest.mark.parametrize("name, options", LOOP_CASES)
def test_same_key_same_bits_and_the_python_loop_agrees(name, options):
    x_T = jax.random.normal(jax.random.key(16), (64, 2))
    key = jax.random.key(17)
    first = _run(name, x_T, 8, key=key, return_trajectory=True, **options)
    again = _run(name, x_T, 8, key=key, return_trajectory=True, **options)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.xs[-1], first.x)  # the trajectory ends at the sample, bit for bit
    np.testing.assert_array_equal(first.xs[0], x_T)
    assert first.xs.shape == (9, 64, 2) and first.x0s.shape == (8, 64, 2) and len(first.sigmas) == 9
    looped = _run(name, x_T, 8, key=key, python_loop=True, return_trajectory=True, **options)
    np.testing.assert_allclose(looped.xs, first.xs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(looped.x0s, first.x0s, rtol=1e-5, atol=1e-5)
    if name not in ("plms", "unipc"):  # stochastic: another key gives another sample
        other = _run(name, x_T, 8, key=jax.random.key(18), return_trajectory=True, **options)
        assert not np.allclose(other.x, first.x)


def test_compiled_once_per_setting_and_weights_are_arguments():
    # The denoiser's arrays are arguments of the compiled program: new weights (here a
    # jax.tree_util.Partial's array), a new grid of the same length, new noise -> no recompilation.
    def scaled(scale, x, t, cond):
        return scale * EPS(x, t, cond)

    x_T = jax.random.normal(jax.random.key(19), (32, 2))
    settings = dict(sampler="ddim", schedule=SCHEDULE, steps=7, parameterization="eps")
    one = sample(jax.tree_util.Partial(scaled, jnp.float32(1.0)), x_T, **settings)
    before = samplers._scan._cache_size()
    half = sample(jax.tree_util.Partial(scaled, jnp.float32(0.5)), x_T + 1, spacing="trailing", **settings)
    assert samplers._scan._cache_size() == before
    assert not np.allclose(one.x, half.x)


def test_clip_x0_keeps_predictions_in_range():
    x_T = jax.random.normal(jax.random.key(20), (64, 2))
    result = _run("ddim", x_T, 10, clip_x0=True, return_trajectory=True)
    assert float(jnp.abs(result.x0s).max()) <= 1.0 and float(jnp.abs(result.x).max()) <= 1.0


BAD = [
    (dict(sampler="dpm_fast"), "unknown sampler"),
    (dict(parameterization="epsilon"), "unknown parameterization"),
    (dict(parameterization="velocity"), "needs a denoiser predicting eps"),
    (dict(steps=0), "steps must be a whole number"),
    (dict(steps=1001), "at most the schedule's 1000"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=True), "steps must be a whole number"),
    (dict(spacing="karras"), "takes spacing"),
    (dict(offset=1, spacing="trailing"), "offset applies only"),
    (dict(eta=1.5), "eta must be in"),
    (dict(churn=1.0), "has no option churn"),
    (dict(schedule=None), "needs the schedule"),
    (dict(shift=3.0), "shift applies to the flow samplers"),
    (dict(sampler="ddpm", key=None), "pass key="),
    (dict(sampler="ddpm", variance="learned"), "variance must be one of"),
    (dict(sampler="unipc", variant="bh3"), "variant must be one of"),
    (dict(sampler="flow_euler", parameterization="velocity"), "pass no schedule"),
    (dict(cond=jnp.zeros(3, jnp.int32)), "one entry per example"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_input_is_one_clear_error_before_compiling(change, message):
    settings = dict(sampler="ddim", schedule=SCHEDULE, steps=10, parameterization="eps", key=jax.random.key(0))
    settings.update(change)
    before = samplers._scan._cache_size()
    with pytest.raises(ValueError, match=message):
        sample(EPS, jnp.zeros((4, 2)), **settings)
    assert samplers._scan._cache_size() == before


def test_steps_may_be_a_numpy_integer():
    settings = dict(schedule=SCHEDULE, parameterization="eps")
    plan = make_plan("ddim", steps=np.int64(10), **settings)
    np.testing.assert_array_equal(plan.grid.alpha_bar, make_plan("ddim", steps=10, **settings).grid.alpha_bar)


def test_few_step_sigma_samplers_need_a_moderate_first_sigma_on_the_cosine_schedule(report):
    """The cosine schedule ends at sigma ~ 4096: Heun and the Karras grid fail at 10 steps from there, not from 80."""
    schedule = Schedule("cosine")
    exact = mixture.exact_denoiser(RING, schedule, "v")
    x_T = jax.random.normal(jax.random.key(2), (2000, 2))
    truth, _ = mixture.sample(RING, jax.random.key(3), 2000)
    distance = {}
    for name, steps in [("heun", 10), ("dpmpp_2m_karras", 10), ("dpmpp_2m", 10)]:
        for sigma_max in (samplers.SIGMA_MAX, None):
            x = sample(exact, x_T, sampler=name, schedule=schedule, steps=steps, parameterization="v", sigma_max=sigma_max)
            distance[name, sigma_max] = metrics.sliced_wasserstein(x.x, truth)
    names = ("heun", "dpmpp_2m_karras", "dpmpp_2m")
    report("sliced W1 at 10 steps, cosine schedule: from sigma 80 / from sigma 4096",
           ", ".join(f"{n} {distance[n, samplers.SIGMA_MAX]:.3f} / {distance[n, None]:.3f}" for n in names))
    assert all(distance[name, samplers.SIGMA_MAX] < 2 * SW_TOLERANCE for name in names), distance  # 10 steps: near
    assert distance["heun", None] > 10 * distance["heun", samplers.SIGMA_MAX]  # from 4096: lost
    assert distance["dpmpp_2m_karras", None] > 1.5 * distance["dpmpp_2m_karras", samplers.SIGMA_MAX]


def test_euler_ancestral_stays_finite_when_the_first_sigma_is_huge():
    # Cosine schedule, 3 steps: sigma falls from 4096 to 1.01, so sigma_up equals sigma_next and
    # sigma_next^2 - sigma_up^2 must not round to a small negative under the square root.
    schedule = Schedule("cosine")
    exact = mixture.exact_denoiser(RING, schedule, "v")
    x = jax.random.normal(jax.random.key(0), (64, 2))
    result = samplers.sample(
        exact, x, sampler="euler_a", schedule=schedule, steps=3, parameterization="v", key=jax.random.key(1),
        sigma_max=None,
    )
    assert np.all(np.isfinite(np.asarray(result.x)))
