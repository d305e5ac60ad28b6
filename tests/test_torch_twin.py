"""The PyTorch twin of the U-Net (benchmarks/torch_unet.py) computes what the project computes.

benchmarks/bench_train.py times the project against that twin, which is only
fair if both do the same work: same outputs to 1e-5, same loss and gradient.
Skipped where PyTorch is absent (as in CI): it is no dependency of the library.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import randomized
from flax import nnx

from diffusion import configs, runs, training
from diffusion.unet import as_denoiser

torch = pytest.importorskip("torch", reason="PyTorch is only for benchmarks/bench_train.py; `make bench` installs it")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_unet  # noqa: E402

B = 4


def nchw(x):
    """An NHWC batch (NumPy or JAX) as an NCHW torch tensor."""
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("cpu", {}),
        # Four levels (28 padded to 32 and cropped back), two attention heads.
        ("tiny", dict(channel_mult=(1, 2, 2, 2), attention_resolutions=(8,), num_heads=2)),
    ],
)
def test_twin_predicts_what_the_unet_predicts(preset, overrides):
    config = configs.make_config(preset, **overrides)
    model = randomized(runs.make_model(config, nnx.Rngs(0)))  # no zero layers: the output depends on everything
    denoiser, _ = as_denoiser(model)
    twin = torch_unet.from_flax(model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, config.image_size, config.image_size, config.in_channels), np.float32)
    t = rng.uniform(0, config.num_timesteps - 1, B).astype(np.float32)  # fractional times
    labels = rng.integers(0, config.num_classes, B)
    for cond in (labels, None):  # class labels, and the null label
        expected = np.asarray(denoiser(x, t, cond))
        with torch.no_grad():
            got = twin(nchw(x), torch.from_numpy(t), None if cond is None else torch.from_numpy(cond)).numpy()
        assert np.std(expected) > 0.1
        np.testing.assert_allclose(got.transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-5)


def test_twin_train_step_computes_the_projects_loss_and_gradient():
    # The tiny network compiles quickly; the objective is the cpu preset's (v, cosine, min-SNR 5).
    config = configs.make_config("tiny", batch_size=B, label_dropout=0.5)
    graphdef, state = training.init_state(config)
    state.params = nnx.state(randomized(nnx.merge(graphdef, state.params)))
    twin_step = torch_unet.TrainStep(torch_unet.from_flax(nnx.merge(graphdef, state.params)), config)
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (B, config.image_size, config.image_size, config.in_channels)).astype(np.float32)
    labels = rng.integers(0, config.num_classes, B).astype(np.int32)

    # The random draws of the project's step, made as training.train_step and losses.denoising_loss make them.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key_labels, key_loss, _ = jax.random.split(key, 3)
    cond = training.drop_labels(key_labels, labels, config.label_dropout, config.num_classes)
    key_t, key_noise = jax.random.split(key_loss)
    t = jax.random.randint(key_t, (B,), 0, config.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    assert 0 < np.sum(np.asarray(cond) == config.num_classes) < B  # some labels dropped, some kept

    step = jax.jit(training.train_step, static_argnames=("graphdef", "config"))
    _, metrics = step(state, x0, labels, graphdef=graphdef, config=config)
    loss, grad_norm = twin_step(nchw(x0), torch.from_numpy(np.array(cond)), torch.from_numpy(np.array(t)), nchw(noise))
    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(grad_norm), float(metrics["grad_norm"]), rtol=1e-4)
