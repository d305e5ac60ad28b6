"""Objectives, checkpoints and training: targets, weighting, the step, resume, devices, faults.

Compiling the train step is the slow part on a CPU (seconds), so the tests
that train share one compiled program through JAX's persistent compilation
cache: the uninterrupted, interrupted and resumed runs compile to identical
programs.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from diffusion import checkpoint, data, forward, losses, training
from diffusion.schedules import Schedule
from diffusion.unet import as_denoiser

REPO = Path(__file__).resolve().parents[1]


# --- Objectives ----------------------------------------------------------------------

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


# --- Config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(learning_rate=-1.0), "learning_rate must be a positive number"),
        (dict(batch_size=0), "batch_size must be a whole number >= 1"),
        (dict(dataset="cifar-100"), "unknown dataset 'cifar-100'; choose one of"),
        (dict(warmup_steps=20), r"warmup_steps \(20\) must be fewer than steps \(20\)"),
        (dict(attention_resolutions=(8,)), r"levels run at \[28, 14\]"),
        (dict(parameterization="eps", zero_terminal_snr=True), "needs parameterization v or x0"),
        (dict(parameterization="velocity", min_snr_gamma=5.0), "set --min-snr-gamma 0"),
        (dict(schedule="quadratic"), "unknown schedule"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(label_dropout=1.5), "label_dropout"),
        (dict(name="a/b"), "plain folder name"),
        (dict(no_such_field=1), "unknown config field"),
    ],
)
def test_bad_config_values_fail_with_a_message(change, message):
    with pytest.raises(training.ConfigError, match=message):
        training.make_config("tiny", **change)


def test_command_line_flags_override_the_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # importing train.py sets it; undo afterwards
    monkeypatch.syspath_prepend(str(REPO))
    import train

    config = train.parse_flags(
        ["--preset", "tiny", "--channel-mult", "1,2", "--learning-rate", "1e-3", "--min-snr-gamma", "2.5"]
    )
    assert config == training.make_config("tiny", channel_mult=(1, 2), learning_rate=1e-3, min_snr_gamma=2.5)
    assert train.parse_flags([]) == training.Config()  # the default is the cpu preset
    assert train.main(["--preset", "tiny", "--learning-rate", "-1", "--runs-dir", str(tmp_path)]) == 1
    assert not (tmp_path / "default").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the restart is for glibc on Linux only")
def test_train_py_restarts_itself_once_with_huge_pages_unless_told_otherwise(tmp_path):
    script = tmp_path / "restart.py"
    script.write_text(
        textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(REPO)!r})
            print("run", os.getpid(), sys.flags.optimize, os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
            import train
            train.restart_with_huge_pages()
            print("done", os.environ.get("GLIBC_TUNABLES"))
        """)
    )
    command = [sys.executable, "-O", str(script), "--steps", "3"]  # an interpreter option and arguments to keep
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def output_lines(env):
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=300).stdout.split("\n")

    lines = output_lines(env)
    first, second = lines[0].split(" ", 3), lines[1].split(" ", 3)
    assert first[0] == second[0] == "run" and first[1] == second[1]  # the same process, run twice
    assert first[2:] == ["1", "None ['--steps', '3']"]
    assert second[2:] == ["1", "glibc.malloc.hugetlb=1 ['--steps', '3']"]
    assert lines[2:] == ["done glibc.malloc.hugetlb=1", ""]
    # Already set (here to nothing, the way to opt out): no restart.
    assert [line.split(" ")[0] for line in output_lines({**env, "GLIBC_TUNABLES": ""})] == ["run", "done", ""]


# --- Checkpoints ------------------------------------------------------------------------


def test_checkpoints_round_trip_keep_last_k_and_are_atomic(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "opt": [np.int32(7), np.ones(2, np.float64)]}
    for step in (1, 2, 3, 4):
        path = checkpoint.save(tmp_path, step, tree, {"channels": 8}, {"note": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert checkpoint.latest(tmp_path) == path
    assert checkpoint.read_json(path, "meta.json") == {"step": 4, "note": 4}
    loaded = checkpoint.load(path, tree)
    assert all(
        np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree))
    )

    # A save that fails halfway leaves the existing checkpoints as they were and no debris.
    class Unsaveable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(tmp_path, 5, {"w": Unsaveable()}, {}, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]

    with pytest.raises(ValueError, match=r"w has shape \(2, 3\).*expects \(3, 2\)"):
        checkpoint.load(path, {"w": np.zeros((3, 2), np.float32), "opt": tree["opt"]})
    with pytest.raises(ValueError, match="has no array 'bias'"):
        checkpoint.load(path, {"bias": np.zeros(1)})


# --- Training -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Share compiled train steps between the runs of this module (they compile to the same program).

    JAX decides once per process whether to use its persistent cache, so the
    decision is reset here, and again afterwards.
    """
    settings = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_loss_decreases_on_a_fixed_batch():
    config = training.make_config("tiny")  # the same program as the runs below, so it compiles once
    images, labels = training.load_training_data(config)
    x0 = jnp.asarray(data.to_model_range(images[:16]))
    y = jnp.asarray(labels[:16], jnp.int32)
    graphdef, state = training.init_state(config)
    step = training.make_train_step(config, graphdef, training.make_mesh(1))

    @jax.jit
    def fixed_loss(params):  # the same times and noise every time, averaged over a few draws
        model = nnx.merge(graphdef, params)
        keys = jax.random.split(jax.random.key(123), 4)
        return jnp.mean(jnp.stack([training.objective(config)(model, x0, y, k) for k in keys]))

    before = float(fixed_loss(state.params))
    state, metrics = step(state, x0, y)
    ema_1 = jax.tree.map(np.asarray, state.ema)  # the step donates (frees) its input
    state, metrics = step(state, x0, y)
    # The EMA after step 2: d ema_1 + (1 - d) params_2, with the warmed-up decay d = min(0.999, 2 / 11).
    expected = jax.tree.map(lambda e, p: 2 / 11 * e + 9 / 11 * np.asarray(p), ema_1, state.params)
    assert all(
        np.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(expected))
    )
    assert not leaves_equal(state.ema, state.params)
    for _ in range(config.steps - 2):
        state, metrics = step(state, x0, y)
    after = float(fixed_loss(state.params))
    assert np.isfinite(metrics["loss"]) and after < 0.8 * before, (before, after)
    assert int(state.step) == config.steps


def test_schedule_label_dropout_and_ema_decay():
    config = training.make_config("tiny", steps=100, warmup_steps=10, learning_rate=1e-3)
    lr = training.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100)], [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 100_000), jnp.int32)
    dropped = np.asarray(training.drop_labels(jax.random.key(0), labels, 0.1, 10))
    changed = dropped != np.asarray(labels)
    assert np.all(dropped[changed] == 10) and abs(np.mean(dropped == 10) - 0.1) < 0.005
    np.testing.assert_allclose(
        [training.ema_decay_at(s, 0.999) for s in (0, 10, 10_000)], [0.1, 11 / 20, 0.999], rtol=1e-6
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny preset trained end to end, uninterrupted: (config, final state)."""
    config = training.make_config("tiny", runs_dir=str(tmp_path_factory.mktemp("runs")), name="whole")
    return config, training.train(config)


def test_tiny_preset_trains_end_to_end(finished_run):
    config, state = finished_run
    run = config.run_dir
    assert int(state.step) == config.steps == 20
    assert [p.name for p in checkpoint.checkpoints(run / "checkpoints")] == ["step_00000010", "step_00000020"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] >= 0 for r in rows)
    assert (run / "loss.png").stat().st_size > 0
    grid = np.asarray(PIL.Image.open(run / "samples" / "step_00000020.png"))
    assert grid.shape == (10 * 28 + 9 * 2, 4 * 28 + 3 * 2)  # one row per class, 4 samples each
    last = checkpoint.latest(run / "checkpoints")
    assert training.config_from_dict(checkpoint.read_json(last, "config.json")) == config
    meta = checkpoint.read_json(last, "meta.json")
    assert meta["step"] == meta["data_position"] == 20 and meta["rng_key_data"] == np.asarray(state.rng).tolist()

    # The EMA weights load back into a model whose denoiser the samplers can call.
    model = training.load_model(run)
    assert leaves_equal(nnx.state(model), state.ema)
    denoiser, kind = as_denoiser(model)
    assert kind == config.parameterization
    assert denoiser(jnp.zeros((2, 28, 28, 1)), 500.0, jnp.array([3, 10])).shape == (2, 28, 28, 1)


def test_ctrl_c_saves_and_resume_is_bit_exact(finished_run, capsys):
    """Interrupted at step 7 by a real SIGINT, then resumed: the same bits as the uninterrupted run."""
    whole_config, whole_state = finished_run
    config = dataclasses.replace(whole_config, name="interrupted")

    def press_ctrl_c(step, metrics):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = training.train(config, callback=press_ctrl_c)
    assert int(stopped.step) == 7
    assert [p.name for p in checkpoint.checkpoints(config.run_dir / "checkpoints")] == ["step_00000007"]
    assert "interrupted at step 7" in capsys.readouterr().out

    resumed = training.train(training.make_config(resume=True, runs_dir=config.runs_dir, name="interrupted"))
    assert int(resumed.step) == 20
    assert leaves_equal(resumed, whole_state)  # params, EMA, optimizer state, step and RNG
    rows = [json.loads(line)["step"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [5, 10, 15, 20]


def test_resuming_another_architecture_names_the_field(finished_run, monkeypatch):
    config, _ = finished_run
    monkeypatch.setattr(training, "make_train_step", lambda *a: pytest.fail("compiled before checking"))
    with pytest.raises(training.ConfigError, match=r"trained with channels=8, but the config asks for channels=16"):
        training.train(training.make_config(resume=True, runs_dir=config.runs_dir, name="whole", channels=16, steps=30))
    with pytest.raises(training.ConfigError, match="already holds checkpoints; pass --resume"):
        training.train(config)
    with pytest.raises(training.ConfigError, match="nothing to resume"):
        training.make_config(resume=True, runs_dir=config.runs_dir, name="never-ran")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = training.make_config(
        "tiny", runs_dir=str(tmp_path), learning_rate=1e30, checkpoint_every=1, grad_clip=float("inf")
    )
    with pytest.raises(
        FloatingPointError,
        match=r"training diverged: .*; the last good checkpoint, .*step_0+\d+, is kept\. Try a lower --learning-rate",
    ):
        training.train(config)
    kept = checkpoint.checkpoints(config.run_dir / "checkpoints")
    assert kept and int(kept[-1].name.split("_")[1]) < config.steps
    params = checkpoint.load(kept[-1], jax.eval_shape(lambda: training.init_state(config))[1])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def three_steps(config, graphdef, state, mesh):
    """Three train steps on the first three batches of the run, on ``mesh``: (final host state, losses)."""
    images, labels = training.load_training_data(config)
    batches = data.batches(images, labels, config.batch_size, config.seed)
    step = training.make_train_step(config, graphdef, mesh)
    state, losses = training.put_state(mesh, state), []
    for _ in range(3):
        x, y = next(batches)
        x = training.put_batch(mesh, data.to_model_range(x))
        assert len(x.sharding.device_set) == mesh.size  # the batch really is split
        state, metrics = step(state, x, training.put_batch(mesh, y.astype(np.int32)))
        losses.append(float(metrics["loss"]))
    return training.to_host(state), losses


# Run in a process that sees two CPU devices: load the initial state, take the
# same three steps on a two-device mesh, save the result.
TWO_DEVICES = textwrap.dedent(
    """
    import sys, jax
    from diffusion import checkpoint, data, training
    sys.path.insert(0, "tests")
    from test_training import three_steps
    assert jax.device_count() == 2, jax.devices()
    initial, out = sys.argv[1:]
    config = training.config_from_dict(checkpoint.read_json(initial, "config.json"))
    graphdef, template = jax.eval_shape(lambda: training.init_state(config))
    state, losses = three_steps(config, graphdef, checkpoint.load(initial, template), training.make_mesh(2))
    checkpoint.save(out, 3, state, config.to_dict(), {"losses": losses}, keep=1)
    try:
        training.train(training.make_config("tiny", batch_size=15))
    except training.ConfigError as err:
        print("ERROR", err)
    """
)


def test_two_devices_give_the_same_parameters_as_one(tmp_path):
    config = training.make_config("tiny")
    graphdef, initial = training.init_state(config)
    initial_path = checkpoint.save(tmp_path / "initial", 0, initial, config.to_dict(), {}, keep=1)
    one, one_losses = three_steps(config, graphdef, initial, training.make_mesh(1))

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", TWO_DEVICES, str(initial_path), str(tmp_path / "two")]
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch_size=15 must be a multiple of the 2 devices" in out.stdout

    two_path = checkpoint.latest(tmp_path / "two")
    two = checkpoint.load(two_path, one)
    np.testing.assert_allclose(checkpoint.read_json(two_path, "meta.json")["losses"], one_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(two.step) == 3


def test_a_renamed_run_resumes_in_its_new_folder(tmp_path):
    # A run trained as "old", then copied to the default folder: `train.py --resume` (no --name)
    # must continue in the default folder, not go back to the name inside config.json.
    saved = training.make_config("tiny", name="old", runs_dir=str(tmp_path))
    folder = tmp_path / training.Config.name
    checkpoint.save(folder / "checkpoints", 5, {"w": np.zeros(2)}, saved.to_dict(), {"data_position": 5}, keep=1)
    resumed = training.make_config("tiny", resume=True, runs_dir=str(tmp_path))
    assert resumed.run_dir == folder
    assert resumed.channels == saved.channels
