"""The tokenizer, the text encoder and cross-attention: round trips, errors, shapes, and that padding is inert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion import captions, tokenizer
from diffusion.errors import InputError

TOKENIZER = tokenizer.caption_tokenizer()


# --- Tokenizer --------------------------------------------------------------------------


def test_every_caption_round_trips_through_the_tokenizer():
    rng = np.random.default_rng(0)
    for _ in range(500):
        digit = int(rng.integers(10))
        bins = {name: names[rng.integers(3)] for name, names in captions.BINS.items()}
        text = captions.caption(rng, digit, bins)
        ids = TOKENIZER.encode(text)
        assert ids.shape == (tokenizer.MAX_TOKENS,) and ids.dtype == np.int32
        assert TOKENIZER.decode(ids) == text.replace(str(digit), captions.DIGIT_WORDS[digit])


def test_prompts_are_normalised_and_padded():
    ids = TOKENIZER.encode("A  Bold 7, leaning RIGHT!")
    assert TOKENIZER.decode(ids) == "a bold seven leaning right"
    assert np.array_equal(ids, TOKENIZER.encode("a bold seven leaning right"))
    assert list(ids[5:]) == [tokenizer.PAD_ID] * 3
    assert TOKENIZER.vocabulary[:2] == (tokenizer.PAD, tokenizer.EMPTY)
    assert set(tokenizer.caption_words()) >= {"seven", "bold", "leaning", "upright", "an"}


def test_the_empty_prompt_is_one_token():
    for empty in ("", "  ", ",."):
        ids = TOKENIZER.encode(empty)
        assert ids[0] == 1 and not ids[1:].any() and TOKENIZER.decode(ids) == ""
    assert np.array_equal(TOKENIZER.empty_ids, TOKENIZER.encode(""))
    assert TOKENIZER.encode_all(["", "a seven"]).shape == (2, tokenizer.MAX_TOKENS)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a bolt seven", r"the word 'bolt', which this model does not know; did you mean bold\?"),
        ("a purple seven", r"the word 'purple'.*the words it knows: a, an, big"),
        ("a 12", r"the word '12'"),
        ("a small bold thick thin seven leaning left right", r"has 9 words; this model reads at most 8"),
    ],
)
def test_bad_prompts_say_what_to_change(prompt, message):
    with pytest.raises(InputError, match=message):
        TOKENIZER.encode(prompt)


def test_a_prompt_must_be_text():
    with pytest.raises(InputError, match="a prompt is text"):
        TOKENIZER.encode(7)
