"""diffusion.generate without a model: settings and their JSON, slerp, layout, input images, atomic writes."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion import generate
from diffusion.generate import GenerationError, Settings

SETTINGS = Settings(
    checkpoint="runs/x/checkpoints/step_00000020", sampler="ddim", steps=2, seeds=(3, 4), labels=(1, None)
)


def test_settings_round_trip_through_json_exactly():
    settings = dataclasses.replace(
        SETTINGS, guidance=2.5, negative_label=7, init_image="in.png", strength=0.6, checkpoint_sha256="ab" * 32
    )
    text = settings.to_json()
    assert text.isascii() and "\n" not in text
    assert Settings.from_json(text) == settings
    assert Settings.from_json(SETTINGS.to_json()) == SETTINGS


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"sampler": "ddim"}', "incomplete settings"),
        (SETTINGS.to_json()[:-1] + ', "colour": 1}', "unknown settings colour"),
        (SETTINGS.to_json().replace('"steps": 2', '"steps": 0'), "steps must be a whole number >= 1"),
        (SETTINGS.to_json().replace('"seeds": [3, 4]', '"seeds": 3'), "seeds must be a list"),
        (SETTINGS.to_json().replace(f'"{SETTINGS.checkpoint}"', "5"), "checkpoint must be text"),
        (SETTINGS.to_json().replace('"trajectory": false', '"trajectory": 0'), "trajectory must be true or false"),
        (SETTINGS.to_json().replace('"spacing": null', '"spacing": 1'), "spacing must be text or null"),
    ],
)
def test_bad_saved_settings_raise_one_clear_error(text, message):
    with pytest.raises(GenerationError, match=message):
        Settings.from_json(text)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seeds=(-1,)), "seeds are whole numbers from 0 to 4294967295"),
        (dict(seeds=(2**32,)), "seeds are whole numbers from 0 to 4294967295"),  # jax.random.key would wrap it to 0
        (dict(seeds=()), "at least one seed"),
        (dict(labels=(1.5,)), "labels are whole numbers"),
        (dict(guidance=float("nan")), "guidance scale must be a number"),
        (dict(seeds=(3,), interpolate=5), "between two different seeds"),
        (dict(seeds=(3, 3), interpolate=5), "between two different seeds"),
        (dict(strength=0.5), "need an init image"),
        (dict(init_image="x.png"), "either a strength"),
        (dict(init_image="x.png", strength=0.5, mask="m.png"), "either a strength"),
        (dict(init_image="x.png", strength=1.5), r"strength must be in \[0, 1\]"),
        (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    ],
)
def test_bad_settings_raise_one_clear_error(change, message):
    with pytest.raises(GenerationError, match=message):
        dataclasses.replace(SETTINGS, **change)


def test_slerp_keeps_the_ends_exactly_and_moves_on_the_sphere():
    a, b = generate.seed_noise([1, 2], (28, 28, 1))
    assert np.array_equal(generate.slerp(a, b, 0.0), a) and np.array_equal(generate.slerp(a, b, 1.0), b)

    # Vectors of equal length: every point keeps it, and the angle to a grows linearly with w.
    u = jnp.array([3.0, 0.0, 0.0])
    v = jnp.array([0.0, 3.0 * np.cos(0.3), 3.0 * np.sin(0.3)])
    for w in (0.25, 0.5, 0.8):
        p = generate.slerp(u, v, w)
        np.testing.assert_allclose(jnp.linalg.norm(p), 3.0, rtol=1e-6)
        np.testing.assert_allclose(np.arccos(np.dot(p, u) / 9.0), w * np.pi / 2, atol=1e-6)
    # Nearly parallel vectors: the straight line, without dividing by sin(0).
    np.testing.assert_allclose(generate.slerp(u, 2 * u, 0.5), 1.5 * u, rtol=1e-6)

    # Two Gaussian noises: the midpoint stays at the typical radius sqrt(D); the straight line's falls by sqrt(2).
    radius = np.sqrt(a.size)
    assert abs(float(jnp.linalg.norm(generate.slerp(a, b, 0.5))) / radius - 1) < 0.05
    assert abs(float(jnp.linalg.norm((a + b) / 2)) / radius - 1 / np.sqrt(2)) < 0.05


def test_noise_of_a_seed_does_not_depend_on_the_others():
    seeds = (5, 9, 2**32 - 1)
    noise = generate.initial_noise(dataclasses.replace(SETTINGS, seeds=seeds), (4, 4, 1))
    assert noise.shape == (3, 4, 4, 1)
    for seed, drawn in zip(seeds, noise):
        assert np.array_equal(drawn, jax.random.normal(jax.random.key(seed), (4, 4, 1)))
    path = generate.initial_noise(dataclasses.replace(SETTINGS, seeds=(5, 9), interpolate=4), (4, 4, 1))
    assert np.array_equal(path[0], noise[0]) and np.array_equal(path[-1], noise[1]) and path.shape[0] == 4


def test_arrangement_rows_are_seeds_and_columns_labels():
    noises, labels, ncols = generate.arrangement(dataclasses.replace(SETTINGS, seeds=(7, 8, 9), labels=(0, 1)))
    assert list(zip(noises, labels)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] and ncols == 2
    assert generate.arrangement(dataclasses.replace(SETTINGS, seeds=tuple(range(10)), labels=(4,)))[2] == 4
    # An interpolation runs along the rows, one row per label.
    noises, labels, ncols = generate.arrangement(dataclasses.replace(SETTINGS, interpolate=3, labels=(0, 1)))
    assert list(zip(noises, labels)) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)] and ncols == 3


def _save_png(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return path


def test_input_images_are_checked_and_resized_only_when_asked(tmp_path):
    digit = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x = generate.load_image(_save_png(tmp_path / "ok.png", digit), 28, 1)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round((x[..., 0] + 1) * 127.5), digit)  # pixels come back exactly

    big = _save_png(tmp_path / "big.png", np.zeros((56, 40), np.uint8))
    with pytest.raises(GenerationError, match=r"is 40×56 but the model makes 28×28 images: .*--resize"):
        generate.load_image(big, 28, 1)
    assert generate.load_image(big, 28, 1, resize=True).shape == (28, 28, 1)
    rgb = _save_png(tmp_path / "rgb.png", np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(GenerationError, match=r"has 3 channel\(s\) \(RGB\), but the model makes 1-channel images"):
        generate.load_image(rgb, 28, 1)
    assert generate.load_image(rgb, 28, 3).shape == (28, 28, 3)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(GenerationError, match="is not an image that can be read"):
        generate.load_image(tmp_path / "text.png", 28, 1)
    with pytest.raises(GenerationError, match="does not exist"):
        generate.load_image(tmp_path / "missing.png", 28, 1)


def test_mask_white_means_generate_black_means_keep(tmp_path):
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, 14:] = 255
    small = _save_png(tmp_path / "small.png", pixels[::2, ::2])
    pixels[0, 0], pixels[1, 0] = 127, 128  # thresholded at half: keep, generate
    mask = generate.load_mask(_save_png(tmp_path / "mask.png", pixels), 28)
    assert mask.shape == (28, 28, 1) and mask.dtype == np.float32
    assert mask[0, 0] == 1 and mask[1, 0] == 0
    assert np.all(mask[2:, :14] == 1) and np.all(mask[:, 14:] == 0)
    with pytest.raises(GenerationError, match=r"mask .* is 14×14 but the model makes 28×28 images"):
        generate.load_mask(small, 28)
    resized = generate.load_mask(small, 28, resize=True)
    assert np.all(resized[:, :14] == 1) and np.all(resized[:, 14:] == 0)


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out"
    generate.write_atomically({target / "a.png": b"one", target / "b.gif": b"two"})
    assert (target / "a.png").read_bytes() == b"one" and (target / "b.gif").read_bytes() == b"two"
    assert oct((target / "a.png").stat().st_mode & 0o777) == oct(0o644)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # fails after the temporary files are written
    with pytest.raises(OSError, match="No space left"):
        generate.write_atomically({target / "a.png": b"new", target / "c.png": b"three"})
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.gif"]
    assert (target / "a.png").read_bytes() == b"one"
