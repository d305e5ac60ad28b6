"""Noise schedules: known values from the papers, monotonicity, spacing, interpolation."""

import math

import numpy as np
import pytest

from diffusion.errors import InputError
from diffusion.schedules import (
    BETA_SCHEDULES,
    Schedule,
    flow_timesteps,
    karras_sigmas,
    sigma_at,
    timestep_at,
    timesteps,
)

ALL_SCHEDULES = [Schedule(name) for name in BETA_SCHEDULES] + [
    Schedule(name, zero_terminal_snr=True) for name in BETA_SCHEDULES
]


def test_linear_schedule_end_value():
    # Ho et al. 2020: betas 1e-4 .. 0.02 over T = 1000 leave alpha_bar_T ~ 4.036e-5.
    s = Schedule("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.alpha_bar[-1] == pytest.approx(4.036e-5, rel=1e-3)


def test_scaled_linear_schedule_end_value():
    # Stable Diffusion's 0.00085 .. 0.012 leaves alpha_bar_T ~ 4.66e-3, so sqrt(alpha_bar_T) ~ 0.068
    # of the signal survives (Lin et al. 2023, Sec. 3.1).
    s = Schedule("scaled_linear", 1000)
    assert s.alpha_bar[-1] == pytest.approx(4.66e-3, rel=2e-3)
    assert math.sqrt(s.alpha_bar[-1]) == pytest.approx(0.068, abs=5e-4)
    assert math.sqrt(s.betas[500]) == pytest.approx((math.sqrt(0.00085) + math.sqrt(0.012)) / 2, rel=2e-3)


def test_cosine_schedule_follows_squared_cosine_and_clips():
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi / 2)^2.
    T, s = 1000, 0.008
    sched = Schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert sched.alpha_bar[0] == pytest.approx(f(1) / f(0), rel=1e-12)
    unclipped = sched.betas < 0.999
    for t in np.flatnonzero(unclipped)[::97]:
        assert sched.alpha_bar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    # The last beta would be 1 (f(T) = cos(pi/2)^2 ~ 0): it is clipped to 0.999.
    assert sched.betas[-1] == pytest.approx(0.999)
    assert 0 < sched.alpha_bar[-1] < 1e-7


def test_sigmoid_schedule_shape():
    s = Schedule("sigmoid", 1000)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert s.betas[0] == pytest.approx(1e-4 + (0.02 - 1e-4) * sig(-6.0), rel=1e-12)
    assert s.betas[-1] == pytest.approx(1e-4 + (0.02 - 1e-4) * sig(6.0), rel=1e-12)
    # Symmetric about the midpoint of the range.
    np.testing.assert_allclose(s.betas + s.betas[::-1], 1e-4 + 0.02, rtol=1e-12)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_zero_terminal_snr_rescaling(name):
    # Lin et al. 2023, Algorithm 1: the last alpha_bar becomes exactly 0, the first is kept.
    plain, rescaled = Schedule(name), Schedule(name, zero_terminal_snr=True)
    assert rescaled.alpha_bar[-1] == 0.0
    assert rescaled.snr[-1] == 0.0 and np.isinf(rescaled.sigmas[-1]) and rescaled.log_snr[-1] == -np.inf
    assert rescaled.alpha_bar[0] == pytest.approx(plain.alpha_bar[0], rel=1e-12)
    assert rescaled.betas[-1] == pytest.approx(1.0)
    # sqrt(alpha_bar) is an affine map of the original one.
    a, b = np.sqrt(plain.alpha_bar), np.sqrt(rescaled.alpha_bar)
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    np.testing.assert_allclose(b, (a - a[-1]) * slope, atol=1e-12)


@pytest.mark.parametrize("sched", ALL_SCHEDULES, ids=lambda s: f"{s.name}-ztsnr{int(s.zero_terminal_snr)}")
def test_schedules_are_monotone_and_consistent(sched):
    assert np.all((sched.betas > 0) & (sched.betas <= 1))
    assert np.all(np.diff(sched.alpha_bar) < 0), "alpha_bar must fall at every step"
    assert np.all(np.diff(sched.sigmas) > 0) and np.all(np.diff(sched.log_snr) < 0)
    np.testing.assert_allclose(np.cumprod(1 - sched.betas)[:-1], sched.alpha_bar[:-1], rtol=1e-10)
    finite = np.isfinite(sched.sigmas)
    np.testing.assert_allclose(sched.snr[finite], 1 / sched.sigmas[finite] ** 2, rtol=1e-10)


def test_schedule_is_hashable_and_resolves_defaults():
    assert Schedule("linear") == Schedule("linear", 1000, 1e-4, 0.02)
    assert hash(Schedule("linear")) == hash(Schedule("linear", 1000, 1e-4, 0.02))
    assert Schedule("linear") != Schedule("linear", zero_terminal_snr=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="quadratic"), "linear, scaled_linear, cosine, sigmoid"),
        (dict(num_timesteps=0), "num_timesteps"),
        (dict(num_timesteps=-5), "num_timesteps"),
        (dict(beta_start=0.0), "0 < beta_start"),
        (dict(beta_end=1.5), "0 < beta_start"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_start <= beta_end"),
        (dict(name="cosine", beta_end=0.02), "cosine schedule has no beta"),
    ],
)
def test_bad_schedule_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


# --- Timestep spacing: expected lists written from the definitions of Lin et al. 2023, Table 2.


@pytest.mark.parametrize(
    "steps, spacing, offset, expected",
    [
        (10, "linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        (10, "leading", 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (10, "trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        # 999/2 = 499.5 rounds half to even -> 500; 1000/3 = 333.33.. steps.
        (3, "linspace", 0, [999, 500, 0]),
        (3, "leading", 0, [666, 333, 0]),
        (3, "trailing", 0, [999, 666, 332]),
        # Stable Diffusion's 50 steps: leading with an offset of 1 starts at 981.
        (50, "leading", 1, list(range(981, 0, -20))),
        (1, "linspace", 0, [0]),
        (1, "trailing", 0, [999]),
        (1000, "leading", 0, list(range(999, -1, -1))),
    ],
)
def test_timestep_spacing(steps, spacing, offset, expected):
    got = timesteps(Schedule("linear", 1000), steps, spacing, offset)
    assert got.dtype == np.int64
    assert got.tolist() == expected


@pytest.mark.parametrize(
    "steps, spacing, message",
    [(0, "leading", "from 1 to"), (1001, "leading", "from 1 to"), (2.5, "leading", "whole number"), (10, "uniform", "linspace, leading, trailing")],
)
def test_bad_spacing_settings(steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        timesteps(Schedule(), steps, spacing)


@pytest.mark.parametrize(
    "count_with, message",
    [
        (lambda n: Schedule(num_timesteps=n), "num_timesteps must be a whole number"),
        (lambda n: timesteps(Schedule(), n), "steps must be a whole number"),
        (lambda n: karras_sigmas(n, 0.03, 14.6), "steps must be a whole number"),
        (lambda n: flow_timesteps(n), "steps must be a whole number"),
    ],
)
def test_counts_take_numpy_integers_and_refuse_bools(count_with, message):
    # One rule for every count (diffusion.errors.is_whole): np.int64(3) is 3, True is a mistake.
    count_with(np.int64(3))
    count_with(3)
    with pytest.raises(InputError, match=message):
        count_with(True)


# --- Continuous sigma(t), Karras sigmas and the flow grid.


def test_sigma_interpolation_matches_table_and_inverts():
    sched = Schedule("scaled_linear")
    t_int = np.array([0, 1, 250, 998, 999], np.float32)
    np.testing.assert_allclose(sigma_at(sched, t_int), sched.sigmas[t_int.astype(int)], rtol=2e-5)
    t_frac = np.array([0.25, 10.5, 400.75, 998.5], np.float32)
    sigmas = np.asarray(sigma_at(sched, t_frac))
    assert np.all((sigmas > sched.sigmas[np.floor(t_frac).astype(int)]) & (sigmas < sched.sigmas[np.ceil(t_frac).astype(int)]))
    np.testing.assert_allclose(timestep_at(sched, sigmas), t_frac, atol=2e-3)


def test_sigma_interpolation_with_zero_terminal_snr_stays_finite():
    sched = Schedule("linear", zero_terminal_snr=True)
    sigma_end = float(sigma_at(sched, 999.0))
    assert np.isfinite(sigma_end) and sigma_end > 1e3


def test_karras_sigmas():
    sigmas = karras_sigmas(10, 0.03, 14.6)
    assert len(sigmas) == 11 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-2] == pytest.approx(0.03)
    assert np.all(np.diff(sigmas) < 0)
    # Evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5); rho = 1 is evenly spaced in sigma.
    np.testing.assert_allclose(np.diff(sigmas[:-1] ** (1 / 7)), np.diff(sigmas[:2] ** (1 / 7))[0], rtol=1e-9)
    np.testing.assert_allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], [5, 4, 3, 2, 1])
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(10, 2.0, 1.0)


def test_flow_timesteps_and_shift():
    t = flow_timesteps(4)
    np.testing.assert_allclose(t, [1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_timesteps(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert np.all(shifted[1:-1] > t[1:-1]), "a shift > 1 spends more of the grid at high noise"
    # SD3 eq. 23 at t = 0.5 with shift 3: 1.5 / 2 = 0.75.
    assert shifted[2] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shift must be positive"):
        flow_timesteps(4, shift=0.0)
