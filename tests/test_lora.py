"""LoRA adapters: the low-rank update's algebra (zero start, the two forms of a convolution's LoRA, merge and
unmerge, scales, two adapters), new class labels, validation, and tiny adapter runs end to end (only the adapter
trains, exact resume, a pinned base, the adapter file, sample.py --lora)."""

import dataclasses
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ctrl_c_at, leaves_equal, randomized
from diffusion import checkpoint, cli, configs, lora, runs, training
from diffusion.errors import CheckpointError, ConfigError
from diffusion.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample as sample_py  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")
SMALL = UNetConfig(image_size=28, in_channels=1, channels=8, channel_mult=(1, 2), attention_resolutions=(14,),
                   norm_groups=4, num_classes=10)
X = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
T = jnp.asarray([10.0, 300.0, 600.0, 990.0])


def base_model():
    return randomized(UNet(SMALL, rngs=nnx.Rngs(0)))


def trained_looking(wrappers, seed=2):
    """Give every B a random value, as if trained (B starts at zero)."""
    rng = np.random.default_rng(seed)
    for wrapper in wrappers:
        wrapper.lora_b[...] = jnp.asarray(0.2 * rng.standard_normal(wrapper.lora_b.shape), jnp.float32)


def test_a_fresh_adapter_leaves_every_output_bit_identical():
    model, labels = base_model(), jnp.asarray([0, 3, 7, 10])
    before = model(X, T, labels)
    wrappers = lora.add_adapter(model, lora.AdapterConfig(rank=4, new_classes=2), nnx.Rngs(1))
    # conv1, conv2, emb_proj of 6 residual blocks (2 down, 2 in the middle, 2 up); qkv, out of 3 attentions
    assert len(wrappers) == 6 * 3 + 3 * 2
    # The null label moved from 10 to 12 and the digits kept theirs.
    np.testing.assert_array_equal(model(X, T, jnp.asarray([0, 3, 7, 12])), before)
    assert model.num_classes == 12


def test_a_convolutions_lora_is_a_low_rank_update_of_its_kernel():
    # Down k×k to r channels (with the base's stride), up 1×1: the same as the kernel W + (alpha/r) A B.
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 6))
    for strides in (1, 2):
        conv = nnx.Conv(6, 5, (3, 3), strides=strides, rngs=nnx.Rngs(0))
        wrapper = lora.LoRA(conv, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
        trained_looking([wrapper])
        kernel = conv.kernel[...] + 1.5 * jnp.einsum("hwir,ro->hwio", wrapper.lora_a[...], wrapper.lora_b[...])
        merged = nnx.Conv(6, 5, (3, 3), strides=strides, rngs=nnx.Rngs(0))
        merged.kernel[...] = kernel
        np.testing.assert_allclose(wrapper(x), merged(x), rtol=1e-5, atol=1e-5)
        assert wrapper.delta().shape == conv.kernel.shape
        assert np.linalg.matrix_rank(np.asarray(wrapper.delta()).reshape(-1, 5)) == 2


def test_merge_then_unmerge_round_trips_and_merged_equals_unmerged():
    model, labels = base_model(), jnp.asarray([0, 3, 7, 10])
    base_kernels = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    wrappers = lora.add_adapter(model, lora.AdapterConfig(rank=2, alpha=4.0), nnx.Rngs(1))
    trained_looking(wrappers)
    unmerged = model(X, T, labels)
    assert float(jnp.max(jnp.abs(unmerged - base_model()(X, T, labels)))) > 1e-2  # the adapter does something
    lora.merge(model)
    np.testing.assert_allclose(model(X, T, labels), unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unmerge it before"):
        lora.set_scale(wrappers, 0.5)
    lora.unmerge(model)
    np.testing.assert_allclose(model(X, T, labels), unmerged, rtol=1e-4, atol=1e-4)
    for wrapper in wrappers:  # each base kernel is back to what it was, to float rounding
        layer = lora.innermost(wrapper)
        assert not wrapper.merged and layer.kernel[...].shape == wrapper.delta().shape
    restored = {k: v for k, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))}
    for path, variable in nnx.to_flat_state(base_kernels):
        moved = path[:-1] + ("base", path[-1])  # a wrapped layer's weights now live under its "base"
        np.testing.assert_allclose(restored.get(path, restored.get(moved)).get_value(), variable.get_value(),
                                   atol=1e-6)


def test_merging_a_copy_leaves_the_original_alone():
    graphdef, state = nnx.split(base_model())
    model = nnx.merge(graphdef, jax.tree.map(np.array, state))  # NumPy weights, as a checkpoint is loaded
    trained_looking(lora.add_adapter(model, lora.AdapterConfig(rank=2), nnx.Rngs(1)))
    labels = jnp.asarray([0, 3, 7, 10])
    before = model(X, T, labels)
    copy = nnx.clone(model)
    lora.merge(copy)
    np.testing.assert_array_equal(model(X, T, labels), before)
    np.testing.assert_allclose(copy(X, T, labels), before, rtol=1e-4, atol=1e-4)


def test_scale_zero_is_the_base_bit_for_bit_and_the_update_is_linear_in_the_scale():
    model, labels = base_model(), jnp.asarray([0, 3, 7, 10])
    base = model(X, T, labels)
    wrappers = lora.add_adapter(model, lora.AdapterConfig(rank=2, targets=("attention",)), nnx.Rngs(1))
    trained_looking(wrappers)
    lora.set_scale(wrappers, 0.0)
    np.testing.assert_array_equal(model(X, T, labels), base)
    # One adapted layer alone is exactly affine in the scale: y(s) = y(0) + s (y(1) - y(0)).
    layer = wrappers[0]
    h = jax.random.normal(jax.random.key(3), (2, 14 * 14, layer.lora_a.shape[0]))
    outputs = {}
    for s in (0.0, 1.0, 1.5):
        lora.set_scale([layer], s)
        outputs[s] = layer(h)
    np.testing.assert_allclose(outputs[1.5] - outputs[0.0], 1.5 * (outputs[1.0] - outputs[0.0]), rtol=1e-4, atol=1e-5)


def test_two_adapters_add_their_updates_each_at_its_own_scale():
    labels = jnp.asarray([0, 3, 11, 12])  # the first adapter's new class is 10, the second's 11, null 12
    model = base_model()
    first = lora.add_adapter(model, lora.AdapterConfig(rank=2, new_classes=1), nnx.Rngs(1))
    trained_looking(first, seed=2)
    second = lora.add_adapter(model, lora.AdapterConfig(rank=3, targets=("conv",), new_classes=1), nnx.Rngs(3))
    trained_looking(second, seed=4)
    lora.set_scale(first, 0.8)
    lora.set_scale(second, 0.5)
    assert model.num_classes == 12 and len(lora.adapters(model)) == len(first) + len(second)
    both = model(X, T, labels)
    lora.merge(model)
    np.testing.assert_allclose(model(X, T, labels), both, rtol=1e-4, atol=1e-4)
    lora.unmerge(model)
    lora.set_scale(second, 0.0)
    only_first = model(X, T, jnp.asarray([0, 3, 10, 12]))
    assert float(jnp.max(jnp.abs(only_first - both))) > 1e-3


def test_the_adapters_size_follows_from_rank_and_layers():
    model = base_model()
    wrappers = lora.add_adapter(model, lora.AdapterConfig(rank=3, targets=("conv", "attention")), nnx.Rngs(1))
    expected = 0
    for wrapper in wrappers:
        *receptive, fan_in, out = lora.innermost(wrapper).kernel.shape
        expected += 3 * (fan_in * int(np.prod(receptive)) + out)  # A: (k·k·in, r), B: (r, out)
    assert lora.count(model, nnx.LoRAParam) == expected
    # The base's own weights are still all there, beside the adapter.
    assert lora.count(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))) == lora.count(base_model())


def test_bad_adapter_settings_say_what_to_change():
    for settings, message in [
        (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(alpha=-1.0), "alpha"),
        (dict(targets=("convs",)), "targets"), (dict(targets=("conv", "conv")), "targets"),
        (dict(targets=()), "targets"),
        (dict(new_classes=-1), "new_classes"),
    ]:
        with pytest.raises(ConfigError, match=message):
            lora.AdapterConfig(**settings)
    with pytest.raises(ConfigError, match="no cross_attention layers"):
        lora.add_adapter(base_model(), lora.AdapterConfig(targets=("cross_attention",)), nnx.Rngs(0))
    unconditional = UNet(dataclasses.replace(SMALL, num_classes=0), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="class-conditional"):
        lora.add_adapter(unconditional, lora.AdapterConfig(new_classes=1), nnx.Rngs(0))


# --- Adapter runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny trained label model; the adapter runs go into its runs folder."""
    config = configs.make_config("tiny", runs_dir=str(tmp_path_factory.mktemp("runs")), name="base", sample_every=0)
    training.train(config)
    return config


@pytest.fixture(scope="module")
def adapter_run(base_run):
    config = runs.start_config("lora-tiny", runs_dir=base_run.runs_dir, base=str(base_run.run_dir), rank=2)
    return config, training.train(config)


def test_an_adapter_run_trains_only_its_adapter_and_pins_its_base(adapter_run, base_run):
    config, state = adapter_run
    opened = runs.open_checkpoint(base_run.run_dir)
    # Pinned when the run started, and still the base's sha256 after training: the base file is untouched.
    assert config.base == str(opened.path.resolve()) and config.base_sha256 == opened.sha256
    assert config.num_classes == 11 and config.base_num_classes == 10 and config.channels == base_run.channels
    names = {path[-1] for path, _ in nnx.to_flat_state(state.params)}
    assert names == {"lora_a", "lora_b", "rows"}  # the checkpoint holds the adapter, not the base
    saved = checkpoint.latest(runs.checkpoint_dir(config.run_dir))
    adapter = runs.open_adapter(config.run_dir)
    assert adapter.path == saved / runs.ADAPTER_FILE and adapter.config == config
    assert adapter.path.stat().st_size < 0.2 * (opened.path / "state.npz").stat().st_size
    # The trained adapter at scale 0 on the frozen base is the base, bit for bit; at scale 1 it is not.
    graphdef, fresh, frozen = training.init_adapter_state(config, runs.load_base(config, config.run_dir))
    adapted = nnx.merge(graphdef, state.ema, frozen)
    base_out = runs.load(base_run.run_dir).model(X, T, jnp.asarray([0, 3, 7, 10]))
    assert not np.array_equal(adapted(X, T, jnp.asarray([0, 3, 7, 11])), base_out)
    lora.set_scale(lora.adapters(adapted), 0.0)
    np.testing.assert_array_equal(adapted(X, T, jnp.asarray([0, 3, 7, 11])), base_out)
    assert not leaves_equal(state.params, fresh.params)
    with pytest.raises(ConfigError, match="its base pinned"):
        configs.make_config("lora-tiny")
    with pytest.raises(ConfigError, match="has its base's channels"):
        runs.start_config("lora-tiny", runs_dir=config.runs_dir, base=str(base_run.run_dir), channels=32)


def test_bad_adapter_run_settings_say_what_to_change(adapter_run, base_run):
    config, _ = adapter_run
    common = dict(runs_dir=config.runs_dir, base=str(base_run.run_dir))
    for overrides, message in [
        (dict(method="half"), "unknown method"), (dict(concept="bold"), "unknown concept"),
        (dict(letters="A1"), "only A-Z and a-z"), (dict(letters="AA"), "each letter may appear once"),
        (dict(concept="hollow"), "set prior_images to 0"), (dict(rank=0), "rank"),
        (dict(targets=("convs",)), "targets"), (dict(num_classes=12), "leave num_classes out"),
        (dict(concept_images=0), "concept_images"),
    ]:
        with pytest.raises(ConfigError, match=message):
            runs.start_config("lora-tiny", **common, **overrides)
    with pytest.raises(ConfigError, match="holds a lora model"):
        runs.start_config("lora-tiny", runs_dir=config.runs_dir, base=str(config.run_dir))
    flags = ["--preset", "lora-tiny", "--runs-dir", config.runs_dir, "--base", str(base_run.run_dir),
             "--targets", "conv,attention", "--letters", "AK"]
    parsed = cli.config_from_flags(flags)
    assert parsed.targets == ("conv", "attention") and parsed.num_classes == 12 and parsed.adapter.new_classes == 2


def test_an_interrupted_adapter_run_resumes_bit_exactly(adapter_run):
    whole_config, whole_state = adapter_run
    config = dataclasses.replace(whole_config, name="lora-interrupted")
    assert int(training.train(config, callback=ctrl_c_at(7)).step) == 7
    resumed = training.train(runs.resume_config(runs_dir=config.runs_dir, name="lora-interrupted"))
    assert leaves_equal(resumed, whole_state)


def test_an_adapter_refuses_a_base_whose_weights_changed(adapter_run, base_run, tmp_path):
    config, _ = adapter_run
    other = configs.make_config("tiny", runs_dir=str(tmp_path), name="other", steps=10, sample_every=0)
    training.train(other)
    model = runs.load_model(runs.open_checkpoint(other.run_dir))
    with pytest.raises(CheckpointError, match="trained on a base of sha256"):
        runs.attach(model, runs.open_checkpoint(other.run_dir), runs.open_adapter(config.run_dir))
    assert sample_py.main(["--checkpoint", str(other.run_dir), "--lora", str(config.run_dir), "--out",
                           str(tmp_path / "x.png")]) == 2
    with pytest.raises(CheckpointError, match="LoRA adapter: sample from its base"):
        runs.load(config.run_dir)


def test_sample_py_draws_the_new_class_and_scale_zero_is_the_base(adapter_run, base_run, tmp_path, capsys):
    config, _ = adapter_run
    common = ["--checkpoint", str(base_run.run_dir), "--steps", "2", "--seed", "0-1", "--label", "0,1"]
    assert sample_py.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert sample_py.main([*common, "--lora", str(config.run_dir), "--lora-scale", "0", "--out",
                           str(tmp_path / "off.png")]) == 0
    assert sample_py.main([*common, "--lora", str(config.run_dir), "--out", str(tmp_path / "on.png")]) == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "off", "on")}
    np.testing.assert_array_equal(pixels["off"], pixels["base"])
    assert not np.array_equal(pixels["on"], pixels["base"])
    # The new class is label 10; the PNG's settings make the same grid again.
    assert sample_py.main(["--checkpoint", str(base_run.run_dir), "--steps", "2", "--lora", str(config.run_dir),
                           "--label", "10", "--out", str(tmp_path / "a.png")]) == 0
    assert sample_py.main(["--from-png", str(tmp_path / "a.png"), "--out", str(tmp_path / "again.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                                  np.asarray(Image.open(tmp_path / "again.png")))
    capsys.readouterr()
    out = ["--out", str(tmp_path / "b.png")]
    assert sample_py.main([*common, "--label", "11", "--lora", str(config.run_dir), *out]) == 2
    assert "outside the classes" in capsys.readouterr().err
    assert sample_py.main([*common, "--lora-scale", "0.5", "--out", str(tmp_path / "c.png")]) == 2
    assert "give the adapter with --lora" in capsys.readouterr().err


def test_two_adapters_on_one_base_and_a_damaged_adapter_file(adapter_run, base_run, tmp_path):
    config, _ = adapter_run
    style = runs.start_config("lora-tiny", runs_dir=config.runs_dir, base=str(base_run.run_dir), name="style",
                              concept="hollow", prior_images=0, targets=("conv",), steps=10)
    training.train(style)
    base = runs.open_checkpoint(base_run.run_dir)
    model = runs.load_model(base)
    runs.attach(model, base, runs.open_adapter(config.run_dir), 0.8)
    runs.attach(model, base, runs.open_adapter(style.run_dir), 0.5)
    assert model.num_classes == 11  # the letter's label; the style adds none
    copied = tmp_path / "adapter.safetensors"
    shutil.copy(runs.open_adapter(config.run_dir).path, copied)
    copied.write_bytes(copied.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="not an adapter file"):
        runs.open_adapter(copied)


def test_a_full_fine_tune_trains_every_weight_and_goes_alone_on_its_base(base_run):
    config = runs.start_config("lora-tiny", runs_dir=base_run.runs_dir, base=str(base_run.run_dir), name="full",
                               method="full", steps=10)
    state = training.train(config)
    base = runs.open_checkpoint(base_run.run_dir)
    base_weights = jax.tree.leaves(nnx.state(runs.load_model(base), nnx.Param))
    assert len(jax.tree.leaves(state.params)) == len(base_weights) + 1  # every weight, and the new label rows
    model = runs.load_model(base)
    runs.attach(model, base, runs.open_adapter(config.run_dir))
    with pytest.raises(CheckpointError, match="full fine-tune"):
        runs.attach(model, base, runs.open_adapter(config.run_dir))
