"""A text-conditioned run end to end: captions per step, prompt dropout, training, exact resume, sampling from a
prompt and a negative prompt, and what a wrong prompt says."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from conftest import ctrl_c_at, leaves_equal
from diffusion import checkpoint, configs, generate, guidance, runs, training

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The text-tiny preset trained end to end, uninterrupted: (config, final state)."""
    config = configs.make_config("text-tiny", runs_dir=str(tmp_path_factory.mktemp("runs")), name="whole")
    return config, training.train(config)


def test_captions_are_drawn_afresh_each_step_and_the_same_on_a_rerun():
    config = configs.make_config("text-tiny")
    images, rows = training.load_training_data(config)
    assert rows.shape == (len(images), 4) and set(np.unique(rows[:, 1:])) == {0, 1, 2}
    first, again, later = (training.conditions(config, rows[:16], step) for step in (3, 3, 4))
    assert first.shape == (16, config.max_tokens) and first.dtype == np.int32
    assert np.array_equal(first, again) and not np.array_equal(first, later)
    words = [config.tokenizer.decode(ids).split() for ids in first]
    digits = [training.captions.DIGIT_WORDS[d] for d in rows[:16, 0]]
    assert all(digit in w for digit, w in zip(digits, words))  # every caption names its own digit


def test_prompt_dropout_replaces_whole_prompts_by_the_empty_one():
    config = configs.make_config("text-tiny")
    ids = jnp.asarray(config.tokenizer.encode_all(["a bold seven leaning left"] * 4000))
    dropped = np.asarray(training.drop_prompts(jax.random.key(0), ids, 0.1, config.tokenizer.empty_ids))
    empty = (dropped == config.tokenizer.empty_ids).all(axis=1)
    kept = (dropped == np.asarray(ids)).all(axis=1)
    assert np.all(empty | kept) and abs(empty.mean() - 0.1) < 0.015


def test_text_preset_trains_end_to_end(text_run):
    config, state = text_run
    assert int(state.step) == config.steps == 20
    grid = np.asarray(PIL.Image.open(config.run_dir / "samples" / "step_00000020.png"))
    assert grid.shape == (10 * 28 + 9 * 2, 4 * 28 + 3 * 2)  # one row per example prompt, 4 samples each
    loaded = runs.load(config.run_dir)
    assert loaded.checkpoint.kind == "text" and loaded.config == config
    assert loaded.conditioning == runs.Conditioning("text") and leaves_equal(nnx.state(loaded.model), state.ema)
    ids = config.tokenizer.encode_all(["a bold seven", ""])
    assert loaded.denoiser(jnp.zeros((2, 28, 28, 1)), 500.0, ids).shape == (2, 28, 28, 1)


def test_an_interrupted_text_run_resumes_bit_exactly(text_run, capsys):
    whole_config, whole_state = text_run
    config = dataclasses.replace(whole_config, name="interrupted")

    assert int(training.train(config, callback=ctrl_c_at(7)).step) == 7
    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="interrupted"))
    assert leaves_equal(resumed, whole_state)  # the same captions, dropouts and noise as the uninterrupted run
    assert "interrupted at step 7" in capsys.readouterr().out


def test_guidance_with_a_negative_prompt_is_the_formula():
    """eps(negative) + s (eps(prompt) - eps(negative)), both branches in one call, on a stub that reads its ids."""
    config = configs.make_config("text-tiny")
    calls = []

    def stub(x, t, ids):
        calls.append(ids.shape)
        return x * ids.sum(axis=1, keepdims=True)[:, :, None, None] + t[:, None, None, None]

    prompt = jnp.asarray(config.tokenizer.encode_all(["a bold seven", "thin 3"]))
    negative = config.tokenizer.encode("leaning right")
    x, t = jnp.ones((2, 1, 1, 1)), jnp.array([10.0, 20.0])
    guided = guidance.classifier_free_guidance(stub, 3.0, negative)(x, t, prompt)
    away = stub(x, t, jnp.broadcast_to(negative, prompt.shape))
    np.testing.assert_allclose(guided, away + 3.0 * (stub(x, t, prompt) - away), rtol=1e-6)
    assert calls[0] == (4, config.max_tokens)  # one call on the doubled batch


def _sample(*args):
    return sample.main([str(a) for a in args])


def test_sample_py_draws_a_prompt_and_redraws_it_from_the_png(text_run, tmp_path, capsys):
    config, _ = text_run
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = ("--checkpoint", config.run_dir, "--steps", 2, "--n", 2, "--prompt", "a bold 7", "--prompt", "thin three")
    assert _sample(*flags, "--negative-prompt", "leaning right", "--out", first) == 0
    settings = generate.read_settings(first)
    assert settings.prompts == ("a bold 7", "thin three") and settings.negative_prompt == "leaning right"
    assert settings.labels == (None,) and settings.guidance == generate.DEFAULT_TEXT_GUIDANCE
    assert _sample("--from-png", first, "--out", again) == 0
    assert first.read_bytes() == again.read_bytes()
    assert np.asarray(PIL.Image.open(first)).shape == (2 * 28 + 2, 2 * 28 + 2)  # two seeds by two prompts

    # The negative prompt is the other branch of guidance: another one gives other pixels.
    other = tmp_path / "other.png"
    assert _sample(*flags, "--negative-prompt", "upright", "--out", other) == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(first)), np.asarray(PIL.Image.open(other)))
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "a bolt seven"], "the word 'bolt', which this model does not know; did you mean bold?"),
        (["--prompt", "a small bold thick thin seven leaning left right"], "this model reads at most 8"),
        (["--negative-prompt", "purple"], "the word 'purple'"),
        (["--label", "3"], "steered by text prompts, not class labels: give --prompt"),
        (["--prompt", "a seven", "--negative-prompt", "thin", "--guidance", "1"], "a negative prompt acts through"),
    ],
)
def test_bad_prompts_are_one_line_errors(text_run, tmp_path, capsys, flags, message):
    config, _ = text_run
    assert _sample("--checkpoint", config.run_dir, "--steps", 2, "--out", tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_evaluate_py_points_a_text_model_to_its_benchmark(text_run, capsys):
    config, _ = text_run
    assert evaluate.main(["--checkpoint", str(config.run_dir), "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert "a text model is judged by its prompts: python benchmarks/text_prompts.py" in err and err.count("\n") == 1


def test_a_label_model_refuses_a_prompt(tmp_path, capsys):
    config = configs.make_config("tiny", runs_dir=str(tmp_path), name="labels")
    _, template = jax.eval_shape(lambda: training.init_state(config))
    state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), template)
    checkpoint.save(runs.checkpoint_dir(config.run_dir), 1, state, config.to_dict(), {"data_position": 1}, keep=1)
    assert _sample("--checkpoint", config.run_dir, "--prompt", "a seven", "--out", tmp_path / "x.png") == 2
    assert "this model takes class labels, not text prompts: give --label" in capsys.readouterr().err
