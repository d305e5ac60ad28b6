"""diffusion.generate without a model: settings and their JSON, the noise of a run, the grid layout."""

import dataclasses

import jax
import numpy as np
import pytest

from diffusion import generate
from diffusion.generate import GenerationError, Settings

SETTINGS = Settings(
    checkpoint="runs/x/checkpoints/step_00000020", sampler="ddim", steps=2, seeds=(3, 4), labels=(1, None)
)


def test_settings_round_trip_through_json_exactly():
    settings = dataclasses.replace(
        SETTINGS, guidance=2.5, negative_label=7, init_image="in.png", strength=0.6, checkpoint_sha256="ab" * 32,
        shift=3,
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
        (dict(shift=-1.0), r"shift must be a number > 0 \(got -1.0\); 1 means no shift"),
        (dict(shift=True), "shift must be a number > 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(change, message):
    with pytest.raises(GenerationError, match=message):
        dataclasses.replace(SETTINGS, **change)

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
