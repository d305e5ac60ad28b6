"""The tokenizer, the text encoder and cross-attention: round trips, errors, shapes, and that padding is inert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomized
from diffusion import captions, tokenizer
from diffusion.attention import Context, CrossAttention, attend
from diffusion.errors import InputError
from diffusion.text_encoder import TextEncoder, TextEncoderConfig, TextUNet, cross_attention_maps
from diffusion.unet import GroupNorm, UNet, UNetConfig

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


# --- Attention with a key mask ------------------------------------------------------------


def test_masked_keys_get_no_weight():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 3, 4)) for i in range(3))
    mask = jnp.array([[True, True, False, True, False], [True] * 5])
    out, weights = attend(q, k, v, mask)
    assert weights.shape == (2, 3, 5, 5) and not weights[0, :, :, ~np.asarray(mask[0])].any()
    kept = np.flatnonzero(mask[0])
    np.testing.assert_allclose(out[0], attend(q[:1], k[:1, kept], v[:1, kept])[0][0], atol=1e-6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_cross_attention_ignores_padded_tokens_and_reads_the_real_ones():
    block = randomized(CrossAttention(8, 6, num_heads=2, norm=GroupNorm(8, 4), dtype=jnp.float32, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    tokens = jax.random.normal(jax.random.key(2), (2, 3, 6))
    short = Context(tokens, jnp.ones((2, 3), bool), tokens.mean(1))
    padding = 100.0 * jax.random.normal(jax.random.key(3), (2, 5, 6))  # anything at all in the padded places
    padded = Context(jnp.concatenate([tokens, padding], 1), jnp.arange(8) < 3, tokens.mean(1))
    padded = padded._replace(mask=jnp.broadcast_to(padded.mask, (2, 8)))
    np.testing.assert_allclose(block(x, short), block(x, padded), atol=1e-5)
    other = short._replace(tokens=tokens[:, ::-1] + 1.0)
    assert float(jnp.abs(block(x, short) - block(x, other)).max()) > 1e-2


def test_the_text_encoder_means_the_same_whatever_the_padding():
    """An encoder reading 12 tokens and one reading 8, with the same weights: the real tokens come out equal."""
    vocab = len(TOKENIZER.vocabulary)
    long = randomized(TextEncoder(TextEncoderConfig(vocab, 12, width=16), rngs=nnx.Rngs(0)))
    short = TextEncoder(TextEncoderConfig(vocab, 8, width=16), rngs=nnx.Rngs(0))
    short_state = nnx.state(short)
    long_state = nnx.state(long)
    nnx.update(short, jax.tree.map(lambda s, l: l[: s.shape[0]] if s.shape != l.shape else l, short_state, long_state))
    ids8 = TOKENIZER.encode_all(["a bold seven", "thin 3 leaning left"])
    ids12 = np.pad(ids8, ((0, 0), (0, 4)))
    a, b = short(ids8), long(ids12)
    assert a.tokens.shape == (2, 8, 16) and a.pooled.shape == (2, 16) and a.mask.sum() == 3 + 4
    np.testing.assert_allclose(a.tokens[a.mask], b.tokens[b.mask], atol=1e-5)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
    with pytest.raises(InputError, match=r"token ids have shape \(B, 8\)"):
        short(ids12)


def test_a_text_unet_reads_its_prompt():
    unet = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                      norm_groups=4, parameterization="v")
    model = TextUNet(unet, TextEncoderConfig(len(TOKENIZER.vocabulary), 8, width=16), TOKENIZER.vocabulary,
                     rngs=nnx.Rngs(0))
    assert model.unet.config.context_dim == 16 and len(model.unet.down[1].cross_attentions) == 1
    model = randomized(model)
    call = nnx.jit(lambda model, x, t, ids: model(x, t, ids))
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([100.0, 600.0])
    seven, bold = TOKENIZER.encode_all(["a seven", "a seven"]), TOKENIZER.encode_all(["a bold seven"] * 2)
    assert call(model, x, t, seven).shape == (2, 8, 8, 1)
    assert float(jnp.abs(call(model, x, t, seven) - call(model, x, t, bold)).max()) > 1e-3
    empty = np.broadcast_to(TOKENIZER.empty_ids, (2, 8))
    np.testing.assert_array_equal(nnx.jit(lambda model, x, t: model(x, t))(model, x, t), call(model, x, t, empty))
    with pytest.raises(InputError, match="reads a text context of width 16"):
        model.unet(x, t)
    plain = UNet(unet, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="reads no text"):
        plain(x, t, context=model.text_encoder(seven))


def test_cross_attention_maps_share_each_position_among_the_real_tokens():
    unet = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                      norm_groups=4, parameterization="v")
    model = randomized(TextUNet(unet, TextEncoderConfig(len(TOKENIZER.vocabulary), 8, width=16), TOKENIZER.vocabulary,
                                rngs=nnx.Rngs(0)))
    ids = TOKENIZER.encode_all(["a bold seven", "thin 3 leaning left"])
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([100.0, 600.0])
    maps = cross_attention_maps(model, x, t, ids)
    assert maps.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, atol=1e-5)
    assert not maps[0, 3:].any() and not maps[1, 4:].any() and maps[1, :4].min() > 0  # 3 and 4 real tokens
    assert all(not hasattr(b, "weights") for _, b in nnx.iter_graph(model) if isinstance(b, CrossAttention))
