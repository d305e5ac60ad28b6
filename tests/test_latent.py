"""Autoencoder and latent runs end to end: training, the scale factor in the checkpoint, exact resume, the pinned
autoencoder, and sampling, img2img and inpainting on latents with one decode at the end."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from flax import nnx

from conftest import ctrl_c_at, leaves_equal
from diffusion import autoencoder, checkpoint, configs, data, generate, latent, runs, training, watermark
from diffusion.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def autoencoder_run(runs_dir):
    """The autoencoder-tiny preset trained for 200 steps: (config, final state)."""
    config = runs.start_config("autoencoder-tiny", runs_dir=str(runs_dir), name="ae", steps=200, sample_every=200,
                               checkpoint_every=100)
    return config, training.train(config)


@pytest.fixture(scope="module")
def latent_run(runs_dir, autoencoder_run):
    """The latent-tiny preset on that autoencoder, uninterrupted: (config, final state)."""
    ae_config, _ = autoencoder_run
    config = runs.start_config("latent-tiny", runs_dir=str(runs_dir), name="latent", autoencoder=str(ae_config.run_dir))
    return config, training.train(config)


def test_an_autoencoder_run_learns_to_reconstruct_held_out_digits(autoencoder_run):
    config, _ = autoencoder_run
    opened, scale = runs.open_autoencoder(config.run_dir)
    assert opened.kind == "autoencoder" and opened.step == 200
    model = runs.load_model(opened)
    x = data.to_model_range(data.load_dataset(config.dataset, "test")[0][:200])
    x_hat = np.asarray(model.decode(model.encode(x)[0]))
    blank = autoencoder.psnr(x, np.full_like(x, -1.0)).mean()  # the PSNR of drawing nothing at all: 10.1 dB
    assert autoencoder.psnr(x, x_hat).mean() > blank + 4.0
    # The scale factor in meta.json is the one its latents give.
    moments = latent.posterior_moments(latent.latent_space(model, 1.0),
                                                data.load_dataset(config.dataset, "train")[0][:2048])
    assert scale == pytest.approx(latent.latent_scale(moments), rel=1e-6)
    grid = np.asarray(PIL.Image.open(config.run_dir / "samples" / "step_00000200.png"))
    assert grid.shape == (4 * 28 + 3 * 2, 8 * 28 + 7 * 2)  # originals and reconstructions, two pairs of rows


def test_an_interrupted_autoencoder_run_resumes_bit_exactly(autoencoder_run):
    whole_config, _ = autoencoder_run
    config = dataclasses.replace(whole_config, name="ae-interrupted", steps=20, checkpoint_every=10)
    whole = training.train(dataclasses.replace(config, name="ae-whole"))
    assert int(training.train(config, callback=ctrl_c_at(7)).step) == 7
    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="ae-interrupted"))
    assert leaves_equal(resumed, whole)


def test_a_latent_run_pins_its_autoencoder_and_trains_on_its_latents(latent_run, autoencoder_run):
    config, state = latent_run
    ae_config, _ = autoencoder_run
    opened, scale = runs.open_autoencoder(ae_config.run_dir)
    assert config.autoencoder == str(opened.path.resolve()) and config.autoencoder_sha256 == opened.sha256
    assert config.latent_scale == scale and config.latent_shape == (7, 7, 4)
    assert config.unet.image_size == 7 and config.unet.in_channels == 4 and config.image_size == 28
    loaded = runs.load(config.run_dir)
    assert loaded.checkpoint.kind == "latent" and loaded.config == config
    assert leaves_equal(nnx.state(loaded.model), state.ema)
    grid = np.asarray(PIL.Image.open(config.run_dir / "samples" / "step_00000020.png"))
    assert grid.shape == (10 * 28 + 9 * 2, 4 * 28 + 3 * 2)  # decoded: digits, not latents


def test_an_interrupted_latent_run_resumes_bit_exactly(latent_run):
    whole_config, whole_state = latent_run
    config = dataclasses.replace(whole_config, name="latent-interrupted")
    assert int(training.train(config, callback=ctrl_c_at(7)).step) == 7
    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="latent-interrupted"))
    assert leaves_equal(resumed, whole_state)  # the same latents drawn from the same posteriors


def test_a_latent_run_refuses_a_changed_autoencoder(latent_run, tmp_path):
    config, _ = latent_run
    moved = dataclasses.replace(config, runs_dir=str(tmp_path), name="copy")
    ae_copy = tmp_path / "ae-copy"
    shutil.copytree(Path(config.autoencoder), ae_copy)
    shutil.copytree(config.run_dir, moved.run_dir)
    saved = runs.checkpoint_dir(moved.run_dir) / "step_00000020"
    values = checkpoint.read_json(saved, "config.json")
    # A relative path is read from the run's folder, wherever the command runs.
    (saved / "config.json").write_text(json.dumps({**values, "autoencoder": "../ae-copy"}))
    assert runs.open_checkpoint(saved).kind == "latent"  # the copy has the same weights: accepted

    weights = dict(np.load(ae_copy / "state.npz"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    np.savez(ae_copy / "state.npz", **weights)
    with pytest.raises(CheckpointError, match="was made with the autoencoder .* but .* now has sha256"):
        runs.open_checkpoint(saved)
    with pytest.raises(CheckpointError, match="was made with the autoencoder"):
        training.train(runs.resume_config(runs_dir=str(tmp_path), name="copy", steps=30))


def test_a_latent_run_needs_an_autoencoder(latent_run, tmp_path, capsys):
    config, _ = latent_run
    flags = ["--preset", "latent-tiny", "--runs-dir", str(tmp_path), "--name", "x"]
    assert train.main([*flags, "--autoencoder", str(config.run_dir)]) == 2
    assert "holds a latent model, not an autoencoder: train one with train.py --preset autoencoder" in (
        capsys.readouterr().err
    )
    assert train.main([*flags, "--autoencoder", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs its autoencoder pinned"):
        configs.make_config("latent-tiny")


def _sample(*args):
    return sample.main([str(a) for a in args])


def test_sample_py_on_a_latent_run_decodes_once_and_redraws_from_the_png(latent_run, tmp_path, capsys):
    config, _ = latent_run
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = ("--checkpoint", config.run_dir, "--steps", 3, "--n", 2, "--label", "3,7", "--trajectory")
    assert _sample(*flags, "--out", first) == 0
    assert np.asarray(PIL.Image.open(first)).shape == (2 * 28 + 2, 2 * 28 + 2)
    strip = np.asarray(PIL.Image.open(tmp_path / "first_trajectory.png"))
    assert strip.shape == (4 * 3 * 28 + 11 * 2, 4 * 28 + 3 * 2)  # per image: decoded x_t, latents, decoded x0
    assert _sample("--from-png", first, "--out", again) == 0
    assert first.read_bytes() == again.read_bytes()
    capsys.readouterr()


def test_img2img_and_inpainting_work_on_latents(latent_run, tmp_path):
    config, _ = latent_run
    digit = data.load_dataset(config.dataset, "test")[0][0]
    PIL.Image.fromarray(digit.reshape(28, 28)).save(tmp_path / "digit.png")
    mask = np.zeros((28, 28), np.uint8)
    mask[14:] = 255  # repaint the bottom half
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    PIL.Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "keep-all.png")
    opened = runs.open_checkpoint(config.run_dir)

    def draw(**choices):
        settings = generate.default_settings(opened, steps=3, labels=(3,), init_image=str(tmp_path / "digit.png"),
                                             **choices)
        return generate.generate(settings, checkpoint=opened).images

    for choices in (dict(strength=0.5), dict(mask=str(tmp_path / "mask.png"))):
        images = draw(**choices)
        assert images.shape == (1, 28, 28, 1) and np.isfinite(images).all()
    # A mask that keeps everything keeps the init image's latent: the result is its reconstruction.
    space = runs.load_latent_space(config, config.run_dir)
    reconstruction = np.asarray(space.decode(space.encode(data.to_model_range(digit[None]))))
    np.testing.assert_allclose(draw(mask=str(tmp_path / "keep-all.png")), reconstruction, atol=1e-4)


def test_a_latent_run_is_watermarked_in_its_latent_noise_and_inverted_back_to_it(latent_run):
    config, _ = latent_run
    opened = runs.open_checkpoint(config.run_dir)
    key = watermark.Key(5)
    images, _ = watermark.generations(opened, 2, key=key, steps=3)
    assert images.shape == (2, 28, 28, 1)
    noise = watermark.recover_noise(runs.load(opened), images, steps=3)  # encoded, then DDIM inversion
    assert noise.shape == (2, 7, 7, 4) and np.isfinite(noise).all()
    assert watermark.key_mask(key, noise.shape[1:]).sum() == 20  # the default band 2 <= |k| <= 3 of a 7 × 7 grid
    p = watermark.find_key(noise, key).p_value
    assert p.shape == (2,) and np.all((0 <= p) & (p <= 1))


def test_an_autoencoder_does_not_sample(autoencoder_run, tmp_path, capsys):
    config, _ = autoencoder_run
    assert _sample("--checkpoint", config.run_dir, "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "holds an autoencoder, which does not generate images" in err and err.count("\n") == 1


def test_a_latent_text_run_trains_on_latents_resumes_bit_exactly_and_samples_prompts(runs_dir, autoencoder_run,
                                                                                      tmp_path, capsys):
    ae_config, _ = autoencoder_run
    config = runs.start_config("latent-text-tiny", runs_dir=str(runs_dir), name="latent-text",
                               autoencoder=str(ae_config.run_dir), steps=12, checkpoint_every=6, sample_every=12)
    assert isinstance(config, configs.TextConfig) and isinstance(config, configs.LatentConfig)
    assert config.unet.image_size == 7 and config.unet.in_channels == 4 and config.unet.context_dim == 8
    whole = training.train(config)
    assert runs.load(config.run_dir).checkpoint.kind == "latent-text"
    grid = np.asarray(PIL.Image.open(config.run_dir / "samples" / "step_00000012.png"))
    assert grid.shape[1] == 4 * 28 + 3 * 2  # decoded: digits, not latents
    interrupted = dataclasses.replace(config, name="latent-text-interrupted")
    assert int(training.train(interrupted, callback=ctrl_c_at(4)).step) == 4
    resumed = training.train(runs.resume_config(runs_dir=str(runs_dir), name="latent-text-interrupted"))
    assert leaves_equal(resumed, whole)  # the same captions, prompt dropout and latents drawn again

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = ("--checkpoint", config.run_dir, "--steps", 3, "--n", 1, "--prompt", "a bold seven", "--negative-prompt",
             "thin")
    assert _sample(*flags, "--out", first) == 0
    assert np.asarray(PIL.Image.open(first)).shape == (28, 28)
    assert _sample("--from-png", first, "--out", again) == 0
    assert first.read_bytes() == again.read_bytes()
    capsys.readouterr()
    assert _sample("--checkpoint", config.run_dir, "--label", "3", "--out", tmp_path / "x.png") == 2
    assert "steered by text prompts, not class labels" in capsys.readouterr().err
