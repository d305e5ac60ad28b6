"""sample.py and evaluate.py end to end, on a tiny checkpoint: files, metadata, reproducibility, editing, bad input.

The checkpoint is the tiny preset's run folder exactly as train.py leaves it
(the same TrainState, written by ``diffusion.checkpoint.save``), but with
random weights instead of trained ones: building it takes a second, where
initialising and compiling a real training run would take half a minute, and
nothing here depends on what the network has learned (tests/test_training.py
covers training and ``load_model``). The CLIs run in-process through
``main(argv)``; one subprocess checks the real entry point.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion import checkpoint, configs, data, evaluation, generate, pictures, noise, runs, training, watermark
from diffusion.schedules import timestep_at
from diffusion.unet import as_denoiser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import detect  # noqa: E402
import evaluate  # noqa: E402
import sample  # noqa: E402

STEPS, BATCH = 2, 4  # every run uses these, so that the runs share compiled programs
TILE = 28 + 2  # a digit and the grid's padding


def random_run(runs_dir, name, **overrides):
    """A run folder of the tiny preset (with ``overrides``), holding one checkpoint of random weights."""
    config = configs.make_config("tiny", runs_dir=str(runs_dir), name=name, **overrides)
    _, template = jax.eval_shape(lambda: training.init_state(config))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype), template)
    checkpoint.save(runs.checkpoint_dir(config.run_dir), 20, state, config.to_dict(), {"data_position": 20}, keep=1)
    return config.run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder of the tiny preset, with one checkpoint of random weights."""
    return random_run(tmp_path_factory.mktemp("runs"), "tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, run_dir):
    """Input pictures, good and bad, and a run folder whose state.npz is cut short."""
    folder = tmp_path_factory.mktemp("inputs")
    digit = data.load_embedded_mnist("test")[0][0]
    half = np.zeros((28, 28), np.uint8)
    half[:, 14:] = 255  # generate the right half, keep the left
    pictures = {
        "digit": digit,
        "mask": half,
        "small": digit[:20, :20],
        "rgb": np.stack([digit] * 3, -1),
        "small_mask": half[::2],
    }
    paths = {name: folder / f"{name}.png" for name in pictures}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(paths[name])
    corrupt = folder / "corrupt"
    shutil.copytree(run_dir, corrupt)
    npz = checkpoint.latest(runs.checkpoint_dir(corrupt)) / "state.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    return {**paths, "corrupt": corrupt, "pixels": digit}


def run(main, *argv):
    """main(argv) of a CLI: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def tiles(image, rows, cols):
    """The digits of a grid (a PNG's path or a Pillow image), (rows, cols, 28, 28)."""
    grid = np.asarray(Image.open(image) if isinstance(image, Path) else image)
    assert grid.shape == (rows * TILE - 2, cols * TILE - 2)
    return np.array(
        [[grid[r * TILE : r * TILE + 28, c * TILE : c * TILE + 28] for c in range(cols)] for r in range(rows)]
    )


def sample_into(out, run_dir, *argv):
    """sample.py on the tiny checkpoint with the tests' steps and batch size; returns its stdout."""
    code, stdout, stderr = run(
        sample.main, "--checkpoint", run_dir, "--steps", STEPS, "--batch-size", BATCH, *argv, "--out", out
    )
    assert code == 0, stderr
    return stdout


GRID_ARGS = ("--seed", "3-4", "--label", "1,2", "--guidance-interval", "0.2,4", "--trajectory")


@pytest.fixture(scope="module")
def grid(run_dir, tmp_path_factory):
    """Seeds 3 and 4 times labels 1 and 2, with the trajectory: {suffix: path} of the files written."""
    out = tmp_path_factory.mktemp("grid")
    stdout = sample_into(out, run_dir, *GRID_ARGS)
    files = sorted(out.iterdir())
    assert [f"wrote {p}" for p in files] == sorted(stdout.splitlines()[1:])
    stem = next(p.stem for p in files if p.suffix == ".gif")
    return {p.name.removeprefix(stem): p for p in files}


def test_grid_carries_its_settings(grid, run_dir):
    assert sorted(grid) == [".gif", ".png", "_trajectory.png"]
    settings = generate.read_settings(grid[".png"])
    last = checkpoint.latest(runs.checkpoint_dir(run_dir))
    assert settings == generate.Settings(
        checkpoint=str(last),
        sampler="ddim",
        steps=STEPS,
        seeds=(3, 4),
        labels=(1, 2),
        guidance=generate.DEFAULT_GUIDANCE,  # the default, recorded
        guidance_interval=(0.2, 4.0),
        trajectory=True,
        batch_size=BATCH,
        checkpoint_sha256=hashlib.sha256((last / "state.npz").read_bytes()).hexdigest(),
    )
    assert grid[".png"].name.startswith("tiny-20-ddim-2-seed3-4-")
    assert generate.read_settings(grid["_trajectory.png"]) == settings
    assert json.loads(Image.open(grid[".gif"]).info["comment"]) == json.loads(settings.to_json())
    assert tiles(grid[".png"], 2, 2).std() > 10  # not a blank grid


def test_from_png_and_the_same_settings_reproduce_every_file_bit_for_bit(grid, run_dir, tmp_path):
    code, _, stderr = run(sample.main, "--from-png", grid[".png"], "--out", tmp_path / "again")
    assert code == 0, stderr
    sample_into(tmp_path / "same", run_dir, *GRID_ARGS)
    for folder in ("again", "same"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == sorted(p.name for p in grid.values())
        for original in grid.values():
            copy = tmp_path / folder / original.name
            assert copy.read_bytes() == original.read_bytes()
            assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(original)))


def test_trajectory_strip_and_gif_show_the_denoising(grid):
    frames = STEPS + 1
    strip = tiles(grid["_trajectory.png"], 2 * 4, frames)  # per image: a row of x_t, a row of predicted x0
    samples = tiles(grid[".png"], 2, 2).reshape(4, 28, 28)
    x_T = noise.seed_noise([3], (28, 28, 1))  # the first image: seed 3, label 1
    assert np.array_equal(strip[0, 0], pictures.to_uint8(x_T)[0, ..., 0])  # frame 0 is the seed's noise
    assert np.array_equal(strip[::2, -1], samples)  # the last frame is the sample
    assert np.all(strip[1::2, -1] == 255)  # nothing is predicted from the sample itself: blank
    assert not np.array_equal(strip[1, 0], strip[1, 1])  # a prediction per step
    gif = Image.open(grid[".gif"])
    assert gif.n_frames == frames
    gif.seek(frames - 1)
    assert np.array_equal(tiles(gif.convert("L"), 2, 2).reshape(4, 28, 28), samples)


def test_interpolation_ends_are_the_single_seed_images(grid):
    """Seeds 3 -> 4 in 5 images, labels 1 and 2: 10 images, in batches of 4, the last padded (the grid's program)."""
    settings = generate.read_settings(grid[".png"])
    seeds = generate.generate(settings)
    path = generate.generate(dataclasses.replace(settings, interpolate=5))
    assert path.ncols == 5 and path.labels == (1,) * 5 + (2,) * 5  # a row per label
    by_seed = seeds.images.reshape(2, 2, 28, 28, 1)  # (seed, label)
    row = path.images.reshape(2, 5, 28, 28, 1)  # (label, step along the path)
    for label in range(2):
        assert np.array_equal(row[label, 0], by_seed[0, label]) and np.array_equal(row[label, -1], by_seed[1, label])
        assert not np.array_equal(row[label, 1], row[label, 0])


def test_guidance_pushes_away_from_the_null_label_or_the_negative_label(run_dir):
    opened = runs.open_checkpoint(run_dir)
    model = runs.load_model(opened)
    denoiser, _ = as_denoiser(model)
    x, t, cond = noise.seed_noise([0, 1], (28, 28, 1)), jnp.full((2,), 500.0), jnp.array([3, 4])
    settings = dataclasses.replace(generate.default_settings(opened), guidance=3.0, guidance_interval=None)
    for negative_label, negative in [(None, 10), (7, 7)]:  # 10: the tiny model's null label
        guided = generate.guided_denoiser(
            model, dataclasses.replace(settings, negative_label=negative_label), opened.config
        )
        away = denoiser(x, t, jnp.full((2,), negative))
        np.testing.assert_allclose(guided(x, t, cond), away + 3.0 * (denoiser(x, t, cond) - away), atol=1e-5)
    unguided = generate.default_settings(opened, guidance=1.0)
    assert unguided.guidance_interval is None  # the default interval goes with guidance, not with guidance 1
    plain = generate.guided_denoiser(model, unguided, opened.config)
    np.testing.assert_array_equal(plain(x, t, cond), denoiser(x, t, cond))
    # In a sigma interval: guided where the noise level is inside it, the conditional model elsewhere.
    schedule = opened.config.noise_schedule
    inside = generate.guided_denoiser(model, dataclasses.replace(settings, guidance_interval=(0.5, 2.0)), opened.config)
    for sigma, scale in [(1.0, 3.0), (10.0, 1.0), (0.1, 1.0)]:
        t = jnp.full((2,), timestep_at(schedule, sigma))
        away = denoiser(x, t, jnp.full((2,), 10))
        np.testing.assert_allclose(inside(x, t, cond), away + scale * (denoiser(x, t, cond) - away), atol=1e-5)


def test_a_flow_model_samples_on_the_shifted_grid(tmp_path):
    """--shift reaches the sampler: each frame of a flow model's run sits at the time t' = s t / (1 + (s - 1) t)
    of eq. 23, and the PNG's settings carry the shift, so --from-png redraws the same digits."""
    flow_run = random_run(tmp_path, "flow", parameterization="velocity")
    opened = runs.open_checkpoint(flow_run)
    settings = generate.default_settings(opened, seeds=(0,), labels=(3,), steps=STEPS, batch_size=BATCH,
                                         trajectory=True, shift=3.0)
    shifted = generate.generate(settings, checkpoint=opened)
    plain = generate.generate(dataclasses.replace(settings, shift=None), checkpoint=opened)
    t = np.linspace(1.0, 0.0, STEPS + 1)
    model = runs.load_model(opened)
    x = noise.seed_noise([0], (28, 28, 1))
    guided = generate.guided_denoiser(model, settings, opened.config)
    for frame, time in enumerate(3 * t[:-1] / (1 + 2 * t[:-1])):  # flow Euler by hand on the shifted grid
        np.testing.assert_allclose(shifted.xs[frame], x, atol=1e-5)
        next_time = 3 * t[frame + 1] / (1 + 2 * t[frame + 1])
        x = x + (next_time - time) * guided(x, jnp.full((1,), time), jnp.array([3]))
    np.testing.assert_allclose(shifted.images, x, atol=1e-5)
    assert not np.allclose(shifted.images, plain.images, atol=1e-3)
    out = tmp_path / "out"
    sample_into(out, flow_run, "--seed", "0", "--label", "3", "--shift", "3")
    png = next(out.glob("*.png"))
    assert generate.read_settings(png).shift == 3.0
    again = tmp_path / "again"
    code, _, stderr = run(sample.main, "--from-png", png, "--out", again)
    assert code == 0, stderr
    assert np.array_equal(np.asarray(Image.open(next(again.glob("*.png")))), np.asarray(Image.open(png)))


def test_img2img_at_strength_zero_returns_the_input(run_dir, inputs, tmp_path):
    sample_into(tmp_path / "x.png", run_dir, "--init-image", inputs["digit"], "--strength", 0, "--label", 5, "--n", 1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), inputs["pixels"])
    assert (
        generate.read_settings(tmp_path / "x.png").init_image_sha256
        == hashlib.sha256(inputs["digit"].read_bytes()).hexdigest()
    )


def test_inpainting_keeps_the_known_region(run_dir, inputs, tmp_path):
    sample_into(
        tmp_path / "x.png", run_dir, "--init-image", inputs["digit"], "--mask", inputs["mask"], "--label", 5, "--n", 2
    )
    for image in tiles(tmp_path / "x.png", 1, 2)[0]:
        assert np.array_equal(image[:, :14], inputs["pixels"][:, :14])  # black in the mask: kept
        assert np.abs(image[:, 14:].astype(int) - inputs["pixels"][:, 14:]).mean() > 20  # white: generated


BAD_INPUT = {
    "missing checkpoint": (["--checkpoint", "{tmp}/nowhere"], "checkpoint .*nowhere does not exist: train one"),
    "corrupt checkpoint": (["--checkpoint", "{corrupt}"], "is corrupt or incomplete"),
    "image size": (["--init-image", "{small}", "--strength", "0.5"], r"is 20×20 but the model makes 28×28 .*--resize"),
    "image channels": (["--init-image", "{rgb}", "--strength", "0.5"], r"has 3 channel\(s\) \(RGB\)"),
    "mask size": (["--init-image", "{digit}", "--mask", "{small_mask}"], r"mask .* is 28×14 but the model makes 28×28"),
    "mask alone": (["--mask", "{mask}"], "strength and mask need an init image"),
    "label": (["--label", "3,10"], r"label 10 is outside the classes .* \(0 to 9\)"),
    "negative label": (["--negative-label", "12"], "label 12 is outside the classes"),
    "negative count": (["--n", "-3"], r"--n must be a whole number >= 1 \(got -3\)"),
    "guidance interval": (["--guidance-interval", "5,1"], r"two noise levels sigma, 0 <= low < high"),
    "guidance interval text": (["--guidance-interval", "low"], "a guidance interval is two sigmas LOW,HIGH or none"),
    "interval without guidance": (["--guidance", "1", "--guidance-interval", "0.3,5"], "give a guidance scale other"),
    "negative seed": (["--seed", "-1"], "argument --seed: seeds are whole numbers >= 0"),
    "unknown sampler": (["--sampler", "ddim2"], "argument --sampler: invalid choice: 'ddim2'"),
    "flow sampler": (
        ["--sampler", "flow_euler"],
        "does not fit this checkpoint, a v-prediction model: use one of ddpm",
    ),
    "too many steps": (["--steps", "5000"], "steps must be at most the schedule's 1000 timesteps"),
    "shift on a diffusion model": (["--shift", "3"], "a shift moves a flow model's grid .* leave --shift out"),
    "shift zero": (["--shift", "0"], r"shift must be a number > 0 \(got 0.0\)"),
    "png without settings": (["--from-png", "{digit}"], "holds no generation settings"),
    "from-png with flags": (["--from-png", "{digit}", "--steps", "3"], "leave out --steps"),
    "watermark, stochastic sampler": (["--watermark-key", "5", "--sampler", "euler_a"], "euler_a draws fresh noise"),
    "watermark and img2img": (
        ["--watermark-key", "5", "--init-image", "{digit}", "--strength", "0.5"], "watermark lives in the starting"
    ),
    "watermark flag without key": (["--watermark-radius", "3"], "describes a key: give its --watermark-key"),
    "watermark seed": (["--watermark-key", "-2"], "watermark key's seed is a whole number"),
    "watermark radius": (["--watermark-key", "2", "--watermark-radius", "20"], "does not fit the 28×28 noise"),
    "watermark band": (["--watermark-key", "2", "--watermark-inner-radius", "4.3", "--watermark-radius", "4.45"],
                       "no frequency k of the 28×28 noise"),
    "watermark inner flag without key": (["--watermark-inner-radius", "3"], "--watermark-inner-radius describes"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_gives_one_line_exit_code_2_and_no_file(case, run_dir, inputs, tmp_path):
    argv, message = BAD_INPUT[case]
    names = {k: v for k, v in inputs.items() if k != "pixels"}
    argv = [a.format(tmp=tmp_path, **names) for a in argv]
    if "--checkpoint" not in argv and "--from-png" not in argv:
        argv += ["--checkpoint", run_dir]
    code, stdout, stderr = run(sample.main, *argv, "--out", tmp_path / "out")
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "out").exists()


def test_a_changed_checkpoint_is_caught_by_from_png(grid, tmp_path):
    settings = dataclasses.replace(generate.read_settings(grid[".png"]), checkpoint_sha256="0" * 64)
    png = tmp_path / "old.png"
    png.write_bytes(pictures.png_bytes(np.zeros((28, 28, 1), np.uint8), {generate.PNG_KEY: settings.to_json()}))
    code, _, stderr = run(sample.main, "--from-png", png, "--out", tmp_path / "out")
    assert code == 2 and "has changed since these settings were saved" in stderr
    assert not (tmp_path / "out").exists()


def test_the_real_entry_point_exits_with_code_2_and_one_line(tmp_path):
    command = [sys.executable, "sample.py", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: checkpoint ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_prints_the_metrics_of_generated_digits(run_dir, monkeypatch):
    judged = []
    evaluate_digits = evaluation.metrics.evaluate_digits

    def recording(images, labels, **kwargs):
        judged.append(labels)
        return evaluate_digits(images, labels, **kwargs)

    monkeypatch.setattr(evaluation.metrics, "evaluate_digits", recording)
    code, stdout, stderr = run(
        evaluate.main, "--checkpoint", run_dir, "--n", 20, "--steps", STEPS, "--batch-size", BATCH, "--json"
    )
    assert code == 0, stderr
    assert judged == [list(range(10)) * 2]  # each digit judged against the class it was asked to be
    row = json.loads(stdout)
    assert row["n"] == 20 and row["sampler"] == "ddim" and row["steps"] == STEPS and row["nfe"] == STEPS
    assert 0.0 <= row["accuracy"] <= 1.0 and row["fid"] > row["floor"] > 0.0  # random weights: far from real digits
    assert row["sampling_s"] > 0 and 0.0 <= row["precision"] <= 1.0
    assert row["guidance_interval"] == list(generate.DEFAULT_GUIDANCE_INTERVAL)
    table = evaluation.table(row)
    assert "classifier FID" in table and f"{row['fid']:.2f}" in table and "in sigma [0.28, 5.42]" in table

    flags = ("--checkpoint", run_dir, "--n", 10, "--steps", STEPS, "--batch-size", BATCH, "--json")
    code, stdout, stderr = run(evaluate.main, *flags, "--guidance-interval", "none")
    assert code == 0, stderr
    assert json.loads(stdout)["guidance_interval"] is None  # the flag reaches the sampler's settings

    code, stdout, stderr = run(evaluate.main, "--checkpoint", run_dir, "--n", 25)
    assert code == 2 and stderr == "error: n must be at least 4 and a multiple of the 10 classes (got 25)\n"


# --- Watermarks: sample.py marks, detect.py looks ------------------------------------------------------------


@pytest.fixture(scope="module")
def marked(run_dir, tmp_path_factory):
    """Seeds 0 and 1 of label 3, marked with key 77: the PNG's path."""
    out = tmp_path_factory.mktemp("marked")
    sample_into(out, run_dir, "--seed", "0-1", "--label", "3", "--watermark-key", "77")
    return next(out.glob("*.png"))


def test_a_watermarked_grid_says_so_but_not_its_key_and_is_redrawn_only_with_the_key(marked, run_dir, tmp_path):
    settings = generate.read_settings(marked)
    assert settings.watermarked and "key" not in json.loads(settings.to_json()).keys() - {"watermarked"}
    code, _, stderr = run(sample.main, "--from-png", marked, "--out", tmp_path / "a")
    assert code == 2 and "give its key (--watermark-key)" in stderr
    code, _, stderr = run(sample.main, "--from-png", marked, "--watermark-key", "77", "--out", tmp_path / "b")
    assert code == 0, stderr
    assert (tmp_path / "b" / marked.name).read_bytes() == marked.read_bytes()
    unmarked = tmp_path / "unmarked"
    sample_into(unmarked, run_dir, "--seed", "0-1", "--label", "3")
    assert not np.array_equal(tiles(next(unmarked.glob("*.png")), 1, 2), tiles(marked, 1, 2))


def test_the_marked_generation_starts_from_the_marked_noise(run_dir):
    opened = runs.open_checkpoint(run_dir)
    settings = generate.default_settings(opened, seeds=(0, 1), labels=(3,), steps=STEPS, batch_size=BATCH,
                                         watermarked=True, trajectory=True)
    key = watermark.Key(77)
    start = generate.generate(settings, checkpoint=opened, watermark_key=key).xs[0]  # frame 0: x_T
    expected = watermark.mark(noise.seed_noise((0, 1), (28, 28, 1)), key)
    np.testing.assert_allclose(start, expected, atol=1e-6)


def test_detect_py_reports_a_p_value_per_image_of_a_grid(marked):
    flags = ("--watermark-key", "77", "--steps", STEPS, "--null", 9)
    code, stdout, stderr = run(detect.main, marked, *flags, "--json")
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [row["index"] for row in rows] == [0, 1]  # the grid's two digits
    assert all(row["p_value"] in np.arange(1, 11) / 10 and row["marked"] == (row["p_value"] < 0.01) for row in rows)
    assert all(0.0 <= row["chi_squared_p_value"] <= 1.0 for row in rows)
    code, stdout, _ = run(detect.main, marked, *flags[:-1], 0)  # no null: the chi-squared p-value decides
    assert code == 0 and re.fullmatch(r"(.*\[[01]\]: distance \d+\.\d \(unmarked noise: about \d+\), "
                                      r"p = (\S+) \(chi-squared: \2\): (marked|not found)\n){2}", stdout), stdout


DETECT_BAD_INPUT = {
    "no key": ([], "give the key to look for"),
    "wrong size": (["--checkpoint", "{run_dir}", "{small}"], "neither one 28×28 picture of this model nor a grid"),
    "other model": (["{other}"], "was made by .*nowhere.* give --checkpoint"),
    "alpha": (["--alpha", "2"], "--alpha is a probability"),
    "steps": (["--steps", "0"], "steps"),
    "null": (["--null", "-1"], "--null is a number of generations"),
}


@pytest.mark.parametrize("case", DETECT_BAD_INPUT)
def test_detect_py_bad_input_is_one_line_and_exit_code_2(case, marked, run_dir, inputs, tmp_path):
    settings = dataclasses.replace(generate.read_settings(marked), checkpoint=str(tmp_path / "nowhere"),
                                   checkpoint_sha256="0" * 64)
    other = tmp_path / "other.png"
    other.write_bytes(pictures.png_bytes(np.zeros((28, 28, 1), np.uint8), {generate.PNG_KEY: settings.to_json()}))
    argv, message = DETECT_BAD_INPUT[case]
    argv = [a.format(run_dir=run_dir, small=inputs["small"], other=other) for a in argv]
    if not any(a.endswith(".png") for a in argv):
        argv.append(str(marked))
    if case != "no key":
        argv += ["--watermark-key", "77"]
    if case == "other model":
        argv += ["--checkpoint", str(run_dir)]
    code, stdout, stderr = run(detect.main, *argv)
    assert code == 2 and stdout == "", stdout
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr
