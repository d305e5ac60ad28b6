"""The U-Net: shapes for every supported input, conditioning, time scaling, dropout, settings checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomized
from diffusion.errors import ConfigError
from diffusion.unet import GroupNorm, UNet, UNetConfig, as_denoiser, group_norm, padded_size, timestep_embedding

SMALL = dict(channels=8, norm_groups=4, num_classes=10)


def make(rngs_seed=0, **settings):
    return UNet(UNetConfig(**{**SMALL, **settings}), rngs=nnx.Rngs(rngs_seed))


@pytest.mark.parametrize(
    "image_size, in_channels, channel_mult, attention_resolutions, internal",
    [
        (28, 1, (1, 2, 2), (7,), [28, 14, 7]),  # digits, three levels: no padding needed
        (28, 1, (1, 2, 2, 2), (8, 4), [32, 16, 8, 4]),  # digits, four levels: padded to 32
        (32, 3, (1, 2, 2), (16,), [32, 16, 8]),  # CIFAR-sized RGB
        (8, 4, (1, 2), (4,), [8, 4]),  # a small latent
        (16, 4, (1, 2, 2), (), [16, 8, 4]),  # a larger latent, no attention outside the middle
    ],
)
def test_shapes_through_the_network(image_size, in_channels, channel_mult, attention_resolutions, internal):
    settings = dict(
        image_size=image_size,
        in_channels=in_channels,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
    )
    model = nnx.eval_shape(lambda: make(**settings))
    assert model.padded_size == internal[0] == padded_size(image_size, len(channel_mult))
    assert [bool(level.attentions) for level in model.down] == [r in attention_resolutions for r in internal]

    x = jax.ShapeDtypeStruct((3, image_size, image_size, in_channels), jnp.float32)
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, jnp.zeros(3), jnp.arange(3)), state, x)
    assert out.shape == x.shape and out.dtype == jnp.float32


# A small conditional model on 8×8×4 "latents": every test below uses this shape, so that
# initialising and compiling happen only a few times.
LATENT = dict(image_size=8, in_channels=4, channel_mult=(1, 2), attention_resolutions=(4,))


@pytest.fixture(scope="module")
def fresh_model():
    return make(**LATENT, dropout=0.5)


@pytest.fixture(scope="module")
def model_and_apply(fresh_model):
    """The model with perturbed weights, and a jitted call of it."""
    model = randomized(fresh_model)
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(x, t, labels, dropout_key):
        return nnx.merge(graphdef, state)(x, t, labels, dropout_key=dropout_key)

    return model, apply


def latents(seed, n):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 4))


def test_fresh_model_predicts_zero(fresh_model):
    """The output convolution is zero-initialised, so an untrained model predicts exactly 0."""
    denoiser, _ = as_denoiser(fresh_model)
    out = denoiser(latents(0, 2), jnp.array([10.0, 900.0]), jnp.array([1, 2]))
    assert np.all(np.asarray(out) == 0.0)
    assert np.all(np.asarray(fresh_model.conv_out.kernel[...]) == 0.0)


def test_null_label_is_the_unconditional_input(model_and_apply):
    """labels=None means the null label num_classes; real labels change the prediction."""
    _, apply = model_and_apply
    x = latents(0, 4)
    t = jnp.array([0.0, 250.0, 500.5, 999.0])
    null = apply(x, t, None, None)
    np.testing.assert_array_equal(null, apply(x, t, jnp.full(4, 10), None))
    assert np.abs(np.asarray(null)).max() > 0
    for label in (0, 7):
        assert np.abs(np.asarray(apply(x, t, jnp.full(4, label), None) - null)).max() > 1e-4


def test_time_changes_the_prediction_smoothly(model_and_apply):
    _, apply = model_and_apply
    x = latents(0, 1)
    a, b, c = (np.asarray(apply(x, jnp.array([t]), None, None)) for t in (100.0, 100.01, 600.0))
    assert np.abs(a - b).max() < 1e-2 * np.abs(a - c).max()  # fractional times are fine, and nearby


def test_dropout_only_with_a_key(model_and_apply):
    _, apply = model_and_apply
    x = latents(0, 2)
    t, y = jnp.array([300.0, 300.0]), jnp.array([1, 2])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(apply(x, t, y, k1), apply(x, t, y, k1))
    assert np.abs(np.asarray(apply(x, t, y, k1) - apply(x, t, y, k2))).max() > 1e-4
    assert np.abs(np.asarray(apply(x, t, y, k1) - apply(x, t, y, None))).max() > 1e-4


def test_timestep_embedding_is_the_sinusoidal_encoding():
    t = jnp.array([0.0, 1.0, 37.5])
    emb = np.asarray(timestep_embedding(t, 8))
    frequencies = 10_000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer(t, frequencies)), np.sin(np.outer(t, frequencies))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert emb.shape == (3, 8) and math.isclose(emb[1, 0], math.cos(1.0), rel_tol=1e-6)


def test_flow_time_is_scaled_by_1000(fresh_model):
    """A flow model at t = 0.5 computes what the same weights compute at timestep 500 when they are an eps model."""
    eps_model = randomized(fresh_model)
    flow_graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(**LATENT, dropout=0.5, parameterization="velocity")))
    flow_model = nnx.merge(flow_graphdef, nnx.state(eps_model))
    assert (flow_model.time_scale, eps_model.time_scale) == (1000.0, 1.0)
    flow, kind = as_denoiser(flow_model)
    eps, _ = as_denoiser(eps_model)
    assert kind == "velocity"
    x, y = latents(3, 2), jnp.array([4, 10])
    np.testing.assert_allclose(flow(x, jnp.full(2, 0.5), y), eps(x, jnp.full(2, 500.0), y), rtol=1e-5, atol=1e-6)


def test_as_denoiser_is_the_model_without_dropout(model_and_apply):
    model, apply = model_and_apply
    denoiser, parameterization = as_denoiser(model)
    assert parameterization == "eps"
    x = latents(4, 3)
    labels = jnp.array([3, 10, 5])
    # A scalar time is broadcast over the batch; cond=None is the null label.
    np.testing.assert_allclose(
        denoiser(x, 420.0, labels), apply(x, jnp.full(3, 420.0), labels, None), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(denoiser(x, 420.0), apply(x, jnp.full(3, 420.0), None, None), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_output(model_and_apply):
    model, apply = model_and_apply
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(**LATENT, dropout=0.5, compute_dtype="bfloat16")))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    bf16, _ = as_denoiser(nnx.merge(graphdef, nnx.state(model)))
    x, t, y = latents(5, 2), jnp.array([50.0, 700.0]), jnp.array([1, 10])
    full, half = np.asarray(apply(x, t, y, None)), np.asarray(bf16(x, t, y))
    assert half.dtype == np.float32
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()  # bfloat16 keeps ~3 significant digits


def test_unconditional_model_rejects_labels():
    model = nnx.eval_shape(lambda: make(**{**LATENT, "num_classes": 0}))
    assert model.label_emb is None
    with pytest.raises(ValueError, match="unconditional"):
        model(jnp.zeros((1, 8, 8, 4)), 0.0, jnp.zeros(1, jnp.int32))


def test_wrong_input_shape_is_reported():
    model = nnx.eval_shape(lambda: make(**LATENT))
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 4\)"):
        model(jnp.zeros((1, 8, 8, 3)), 0.0)


GOOD = dict(
    image_size=28,
    in_channels=1,
    channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(7,),
    num_heads=1,
    dropout=0.0,
    num_classes=10,
    norm_groups=8,
    parameterization="eps",
    compute_dtype="float32",
)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention_resolutions=(8,)), r"match no level.*\[28, 14, 7\]"),
        (dict(channel_mult=(1, 2, 2, 2, 2, 2)), "fewer channel_mult"),
        (dict(channel_mult=()), "at least one level"),
        (dict(norm_groups=5), "norm_groups=5 does not divide the 32 channels"),
        (dict(num_heads=3), "num_heads=3 does not divide"),
        (dict(parameterization="score"), "eps, x0, v, velocity"),
        (dict(compute_dtype="float16"), "float32, bfloat16"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(channels=0), "channels must be a whole number"),
        (dict(num_classes=-1), "0 means unconditional"),
    ],
)
def test_bad_settings_say_what_to_change(change, message):
    UNetConfig(**GOOD)
    with pytest.raises(ConfigError, match=message):
        UNetConfig(**{**GOOD, **change})


def test_whole_number_settings_refuse_bools_and_take_numpy_integers():
    assert UNetConfig(**{**GOOD, "num_res_blocks": np.int64(2)}).num_res_blocks == 2
    with pytest.raises(ConfigError, match="num_res_blocks must be a whole number >= 1"):
        UNetConfig(**{**GOOD, "num_res_blocks": True})


@pytest.mark.parametrize("shape, groups", [((4, 7, 7, 16), 8), ((3, 5, 6, 12), 4), ((2, 4, 4, 8), 1), ((2, 3, 3, 8), 8)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
    """The project's GroupNorm (per-channel sums first) against nnx.GroupNorm, forward and backward.

    Inputs with a large offset stress the E[x^2] - mu^2 variance, which both use.
    """
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(keys[0], shape) + 2.0
    scale = 1.0 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    cotangent = jax.random.normal(keys[3], shape)
    reference = nnx.GroupNorm(shape[-1], groups, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(reference)

    def flax_norm(x, scale, bias):
        return nnx.merge(graphdef, nnx.State({"scale": nnx.Param(scale), "bias": nnx.Param(bias)}))(x)

    def ours(x, scale, bias):
        return group_norm(x, scale, bias, groups)

    for a, b in zip(
        jax.vjp(ours, x, scale, bias)[1](cotangent) + (ours(x, scale, bias),),
        jax.vjp(flax_norm, x, scale, bias)[1](cotangent) + (flax_norm(x, scale, bias),),
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    # Each (image, group) is normalised: mean 0, variance 1 before the affine map.
    y = np.asarray(group_norm(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), groups))
    per_group = y.reshape(shape[0], -1, groups, shape[-1] // groups).transpose(0, 2, 1, 3).reshape(shape[0], groups, -1)
    np.testing.assert_allclose(per_group.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_group.var(-1), 1.0, rtol=1e-3)


def test_group_norm_module_has_flax_parameter_names():
    """Checkpoints written with nnx.GroupNorm load into GroupNorm: same parameter paths, shapes and initial values."""
    ours = nnx.to_flat_state(nnx.state(GroupNorm(16, 4), nnx.Param))
    theirs = nnx.to_flat_state(nnx.state(nnx.GroupNorm(16, 4, rngs=nnx.Rngs(0)), nnx.Param))
    assert [path for path, _ in ours] == [path for path, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(a.get_value(), b.get_value())
