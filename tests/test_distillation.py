"""Distillation: the progressive target and its weighting on data whose exact denoiser is known, the student's
start from its teacher, and tiny progressive and consistency runs end to end (pinned teacher, exact resume,
sampling with the sampler each was distilled for, the next stage of progressive distillation)."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ctrl_c_at, leaves_equal, randomized
from diffusion import checkpoint, configs, distillation, generate, mixture, runs, training
from diffusion.errors import CheckpointError, ConfigError
from diffusion.samplers import sample
from diffusion.schedules import Schedule

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample as sample_py  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")
SCHEDULE = Schedule("linear", 1000)


def test_one_step_on_the_progressive_target_lands_where_two_teacher_steps_do():
    with jax.enable_x64(True):
        ring = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a,
                            mixture.ring_mixture())
        exact = mixture.exact_denoiser(ring, SCHEDULE, "x0")
        x_T = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
        teacher = sample(exact, x_T, sampler="ddim", schedule=SCHEDULE, steps=4, parameterization="x0",
                         spacing="trailing", return_trajectory=True)
        timesteps, alpha_bars = distillation.teacher_grid(SCHEDULE, 4)
        np.testing.assert_array_equal(timesteps, teacher.timesteps)  # the teacher's grid is the sampler's
        for i in (0, 2):  # the student's two steps: teacher frames 0 -> 2 and 2 -> 4
            x_t, x_next = teacher.xs[i], teacher.xs[i + 2]
            target = distillation.progressive_target(x_t, x_next, alpha_bars[i], alpha_bars[i + 2])
            one_step = distillation.ddim_jump(x_t, target, alpha_bars[i], alpha_bars[i + 2])
            np.testing.assert_allclose(one_step, x_next, rtol=1e-10, atol=1e-10)
            assert np.max(np.abs(target - teacher.x0s[i])) > 1e-3  # not the teacher's own x0_hat


def test_the_progressive_loss_is_zero_for_the_exact_student_and_snr_plus_one_weighted():
    # Data at one point m: x0_hat = m is exact everywhere, so two DDIM steps are one and the target is m.
    m = jnp.asarray([[[[0.5]]]])
    exact = lambda x, t, labels, s: jnp.broadcast_to(m, x.shape)  # noqa: E731
    off = lambda x, t, labels, s: jnp.broadcast_to(m, x.shape) + 1.0  # noqa: E731
    x0 = jnp.broadcast_to(m, (256, 1, 1, 1))
    labels = jnp.zeros(256, jnp.int32)
    settings = dict(schedule=SCHEDULE, teacher_steps=8, guidance_range=(1.0, 3.0))
    assert float(distillation.progressive_loss(exact, exact, x0, labels, jax.random.key(0), **settings)) < 1e-8
    loss = distillation.progressive_loss(off, exact, x0, labels, jax.random.key(0), **settings)
    _, alpha_bars = distillation.teacher_grid(SCHEDULE, 8)
    weights = 1.0 / (1.0 - alpha_bars[0:8:2])  # SNR + 1 at the student's four timesteps
    assert weights.min() < float(loss) < weights.max()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def teacher_run(runs_dir):
    config = configs.make_config("tiny", runs_dir=str(runs_dir), name="teacher", sample_every=0)
    return config, training.train(config)


@pytest.fixture(scope="module")
def progressive_run(runs_dir, teacher_run):
    config = runs.start_config("progressive-tiny", runs_dir=str(runs_dir), teacher=str(teacher_run[0].run_dir))
    return config, training.train(config)


@pytest.fixture(scope="module")
def consistency_run(runs_dir, teacher_run):
    # A range of scales here (the presets distil one), so that the per-example scale is exercised too.
    config = runs.start_config("consistency-tiny", runs_dir=str(runs_dir), teacher=str(teacher_run[0].run_dir),
                               guidance_min=1.0, guidance_max=4.0)
    return config, training.train(config)


def test_a_student_starts_as_its_teacher_at_every_guidance_scale(teacher_run):
    config, _ = teacher_run
    teacher = randomized(runs.load(config.run_dir).model)
    student_config = dataclasses.replace(
        runs.start_config("consistency-tiny", runs_dir=config.runs_dir, teacher=str(config.run_dir)), name="s")
    graphdef, state = training.init_state(student_config, teacher)
    student = nnx.merge(graphdef, state.params)
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    t, labels = jnp.asarray([10, 300, 600, 990]), jnp.asarray([0, 3, 7, 10])
    for scale in (1.0, 2.5, 4.0):
        np.testing.assert_array_equal(student(x, t, labels, guidance=jnp.full(4, scale)), teacher(x, t, labels))
    with pytest.raises(ValueError, match="pass guidance"):
        student(x, t, labels)


def test_a_progressive_run_pins_its_teacher_and_names_the_next_stage(progressive_run, teacher_run):
    config, state = progressive_run
    opened = runs.open_checkpoint(teacher_run[0].run_dir)
    assert config.name == "progressive-2" and config.teacher_steps == 4 and config.sample_steps == 2
    assert config.teacher == str(opened.path.resolve()) and config.teacher_sha256 == opened.sha256
    assert config.channels == teacher_run[0].channels and config.unet.guidance_embedding
    loaded = runs.load(config.run_dir)
    assert loaded.checkpoint.kind == "distill" and leaves_equal(nnx.state(loaded.model), state.ema)
    assert not leaves_equal(state.params, training.init_state(config, runs.load(opened).model)[1].params)
    following = runs.start_config("progressive-tiny", runs_dir=config.runs_dir, teacher=str(config.run_dir))
    assert following.name == "progressive-1" and following.teacher_steps == 2 and following.sample_steps == 1
    assert following.teacher_method == "progressive"
    with pytest.raises(ConfigError, match="has its teacher's teacher_steps"):
        runs.start_config("progressive-tiny", runs_dir=config.runs_dir, teacher=str(config.run_dir), teacher_steps=8)
    with pytest.raises(ConfigError, match="has its teacher's channels"):
        runs.start_config("progressive-tiny", runs_dir=config.runs_dir, teacher=str(teacher_run[0].run_dir),
                          channels=32)
    with pytest.raises(ConfigError, match="needs its teacher pinned"):
        configs.make_config("progressive-tiny")


def test_an_interrupted_consistency_run_resumes_bit_exactly(consistency_run):
    whole_config, whole_state = consistency_run
    assert whole_config.name == "consistency" and whole_config.sampling == dict(sampler="lcm", origin_steps=50)
    config = dataclasses.replace(whole_config, name="consistency-interrupted")
    assert int(training.train(config, callback=ctrl_c_at(7)).step) == 7
    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="consistency-interrupted"))
    assert leaves_equal(resumed, whole_state)  # params, the EMA target network, optimizer, step, RNG


def test_a_consistency_model_refuses_to_teach_and_a_changed_teacher_is_noticed(consistency_run, tmp_path):
    config, _ = consistency_run
    with pytest.raises(ConfigError, match="is a consistency model"):
        runs.start_config("progressive-tiny", runs_dir=str(tmp_path), teacher=str(config.run_dir))
    saved = checkpoint.latest(runs.checkpoint_dir(config.run_dir))
    values = checkpoint.read_json(saved, "config.json")
    copy = tmp_path / "copy" / "checkpoints" / saved.name
    copy.mkdir(parents=True)
    for name in ("state.npz", "meta.json"):
        (copy / name).write_bytes((saved / name).read_bytes())
    (copy / "config.json").write_text(json.dumps({**values, "teacher_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="was made with the teacher"):
        runs.open_checkpoint(copy)


def _sample(*args):
    return sample_py.main([str(a) for a in args])


def test_students_sample_with_the_sampler_they_were_distilled_for(consistency_run, progressive_run, teacher_run,
                                                                 tmp_path, capsys):
    for config, expected in ((consistency_run[0], "lcm 2 steps, 2 network calls"),
                             (progressive_run[0], "ddim 2 steps, 2 network calls")):
        assert _sample("--checkpoint", config.run_dir, "--out", tmp_path / "a.png", "--label", 3) == 0
        assert expected in capsys.readouterr().out
    settings = generate.default_settings(runs.open_checkpoint(consistency_run[0].run_dir), labels=(3,), seeds=(0, 1))
    assert (settings.sampler, settings.steps, settings.guidance) == ("lcm", 2, consistency_run[0].sample_guidance)
    first = generate.generate(settings).images
    np.testing.assert_array_equal(generate.generate(settings).images, first)  # the same seeds, the same bits
    for checkpoint_dir, flags, message in (
        (teacher_run[0].run_dir, ("--sampler", "lcm"), "the lcm sampler needs a consistency model"),
        (progressive_run[0].run_dir, ("--sampler", "lcm"), "trained a progressive student"),
        (consistency_run[0].run_dir, ("--guidance", 7), "distilled at guidance scales 1 to 4"),
        (progressive_run[0].run_dir, ("--guidance", 3), "distilled at guidance scale 1.5 only"),
        (consistency_run[0].run_dir, ("--negative-label", 2), "takes no negative label"),
    ):
        assert _sample("--checkpoint", checkpoint_dir, "--out", tmp_path / "b.png", *flags) == 2
        assert message in capsys.readouterr().err
