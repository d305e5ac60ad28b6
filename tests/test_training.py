"""Training: the step, the loop, resume bit for bit, devices, faults.

Compiling the train step is the slow part on a CPU (seconds), so the tests
that train share one compiled program through JAX's persistent compilation
cache: the uninterrupted, interrupted and resumed runs compile to identical
programs.
"""

import dataclasses
import json
import os
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

from conftest import ctrl_c_at, leaves_equal
from diffusion import checkpoint, configs, data, runs, training
from diffusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


def test_loss_decreases_on_a_fixed_batch():
    config = configs.make_config("tiny")  # the same program as the runs below, so it compiles once
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
    config = configs.make_config("tiny", steps=100, warmup_steps=10, learning_rate=1e-3)
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
    config = configs.make_config("tiny", runs_dir=str(tmp_path_factory.mktemp("runs")), name="whole")
    return config, training.train(config)


def test_tiny_preset_trains_end_to_end(finished_run):
    config, state = finished_run
    run = config.run_dir
    assert int(state.step) == config.steps == 20
    assert [p.name for p in checkpoint.checkpoints(runs.checkpoint_dir(run))] == ["step_00000010", "step_00000020"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] >= 0 for r in rows)
    assert (run / "loss.png").stat().st_size > 0
    grid = np.asarray(PIL.Image.open(run / "samples" / "step_00000020.png"))
    assert grid.shape == (10 * 28 + 9 * 2, 4 * 28 + 3 * 2)  # one row per class, 4 samples each
    last = checkpoint.latest(runs.checkpoint_dir(run))
    assert runs.read_config(last) == ("denoiser", config)
    meta = checkpoint.read_json(last, "meta.json")
    assert meta["step"] == meta["data_position"] == 20 and meta["rng_key_data"] == np.asarray(state.rng).tolist()

    # The EMA weights load back into a model whose denoiser the samplers can call.
    loaded = runs.load(run)
    assert loaded.checkpoint.path == last and loaded.config == config
    assert leaves_equal(nnx.state(loaded.model), state.ema)
    assert leaves_equal(nnx.state(runs.load_model(loaded.checkpoint, ema=False)), state.params)
    assert loaded.parameterization == config.parameterization
    assert loaded.conditioning == runs.Conditioning("label", 10)
    assert loaded.denoiser(jnp.zeros((2, 28, 28, 1)), 500.0, jnp.array([3, 10])).shape == (2, 28, 28, 1)


def test_ctrl_c_saves_and_resume_is_bit_exact(finished_run, capsys):
    """Interrupted at step 7 by a real SIGINT, then resumed: the same bits as the uninterrupted run."""
    whole_config, whole_state = finished_run
    config = dataclasses.replace(whole_config, name="interrupted")

    stopped = training.train(config, callback=ctrl_c_at(7))
    assert int(stopped.step) == 7
    assert [p.name for p in checkpoint.checkpoints(runs.checkpoint_dir(config.run_dir))] == ["step_00000007"]
    assert "interrupted at step 7" in capsys.readouterr().out

    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="interrupted"))
    assert int(resumed.step) == 20
    assert leaves_equal(resumed, whole_state)  # params, EMA, optimizer state, step and RNG
    rows = [json.loads(line)["step"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [5, 10, 15, 20]


def test_resuming_another_architecture_names_the_field(finished_run, monkeypatch):
    config, _ = finished_run
    monkeypatch.setattr(training, "make_train_step", lambda *a: pytest.fail("compiled before checking"))
    with pytest.raises(ConfigError, match=r"trained with channels=8, but the config asks for channels=16"):
        training.train(runs.resume_config(runs_dir=config.runs_dir, name="whole", channels=16, steps=30))
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        training.train(config)
    with pytest.raises(ConfigError, match="nothing to resume"):
        runs.resume_config(runs_dir=config.runs_dir, name="never-ran")
    with pytest.raises(ConfigError, match="nothing to resume"):
        training.train(dataclasses.replace(config, name="never-ran", resume=True))


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = configs.make_config(
        "tiny", runs_dir=str(tmp_path), learning_rate=1e30, checkpoint_every=1, grad_clip=float("inf")
    )
    with pytest.raises(
        FloatingPointError,
        match=r"training diverged: .*; the last good checkpoint, .*step_0+\d+, is kept\. Try a lower --learning-rate",
    ):
        training.train(config)
    kept = checkpoint.checkpoints(runs.checkpoint_dir(config.run_dir))
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
    from diffusion import checkpoint, configs, data, runs, training
    from diffusion.errors import ConfigError
    sys.path.insert(0, "tests")
    from test_training import three_steps
    assert jax.device_count() == 2, jax.devices()
    initial, out = sys.argv[1:]
    config = runs.read_config(initial)[1]
    graphdef, template = jax.eval_shape(lambda: training.init_state(config))
    state, losses = three_steps(config, graphdef, checkpoint.load(initial, template), training.make_mesh(2))
    checkpoint.save(out, 3, state, config.to_dict(), {"losses": losses}, keep=1)
    try:
        training.train(configs.make_config("tiny", batch_size=15))
    except ConfigError as err:
        print("ERROR", err)
    """
)


def test_two_devices_give_the_same_parameters_as_one(tmp_path):
    config = configs.make_config("tiny")
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
    saved = configs.make_config("tiny", name="old", runs_dir=str(tmp_path))
    folder = tmp_path / configs.Config.name
    checkpoint.save(runs.checkpoint_dir(folder), 5, {"w": np.zeros(2)}, saved.to_dict(), {"data_position": 5}, keep=1)
    resumed = runs.resume_config(runs_dir=str(tmp_path))
    assert resumed.run_dir == folder and resumed.resume
    assert resumed.channels == saved.channels
