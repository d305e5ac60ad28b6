"""Does the input pipeline keep up? Images/s the loader delivers beside images/s the train step consumes.

    .venv/bin/python benchmarks/bench_loader.py [--batch-size 256] [--batches 200]

The loader is what ``diffusion.training.train`` does on the host for every
step (``training.host_batches``): draw the batch (``data.batches``: a
shuffled gather from the uint8 array), optionally crop and flip it
(``data.augment``), and hand over the uint8 pixels, which the train step
scales on the device; beside it, the same with the float32 conversion done on
the host, as the loop did before. ``train`` runs it in a background thread
(``data.prefetch``), so it overlaps the device's step: it keeps up when its
rate is above the step's. It runs on CIFAR-10-shaped data
(50,000 RGB images, 32 × 32, or 36 × 36 for random crops) made up here, so
no download is needed: the work does not depend on the pixels. A folder of
your own pictures is decoded once into its cache (``diffusion.folders``);
that one-off rate is measured too, on JPEG photographs of 256 × 256 written
here.

The consumer is the ``gpu`` preset's compiled train step at 32 × 32 × 3
on this machine's CPU, and, since no GPU is measured here, the rate a GPU
would need, computed from the step's FLOPs per image (XLA's cost analysis)
at an assumed share of a GPU's bf16 peak (``--gpu-tflops``,
``--gpu-utilisation``). That figure is an assumption, printed as one.
"""

import argparse
import os
import platform
import tempfile
import time
import types
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from diffusion import configs, data, folders, training


def loader_rate(images, batch_size, batches, crop="center", flip=False, on_host=False):
    """Images/s of the host's part of a training step (``training.host_batches``) over ``batches`` batches, after
    one warm-up; ``on_host``: also scaled to float32 there (``data.to_model_range``), as the loop once did."""
    config = types.SimpleNamespace(kind="denoiser", batch_size=batch_size, seed=0, image_size=32, crop=crop,
                                   flip=flip, num_classes=10)
    stream = training.host_batches(config, images, np.zeros(len(images), np.int32), 0)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(stream)
        if on_host:
            data.to_model_range(x)
    return batches * batch_size / (time.perf_counter() - start)


def train_step_rate(batch_size, steps):
    """Images/s of the gpu preset's train step at 32 x 32 x 3 on this machine, and its FLOPs per image."""
    config = configs.make_config("gpu", dataset="cifar10", image_size=32, in_channels=3, batch_size=batch_size)
    mesh = training.make_mesh(1)
    graphdef, state = training.init_state(config)
    step = training.make_train_step(config, graphdef, mesh)
    x = np.random.default_rng(0).standard_normal((batch_size, 32, 32, 3), np.float32)
    y = np.zeros(batch_size, np.int32)
    state = training.put_state(mesh, state)
    compiled = step.lower(state, training.put_batch(mesh, x), training.put_batch(mesh, y)).compile()
    flops = compiled.cost_analysis()["flops"] / batch_size
    state, metrics = step(state, training.put_batch(mesh, x), training.put_batch(mesh, y))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, training.put_batch(mesh, x), training.put_batch(mesh, y))
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start), flops


def decode_rate(count, side):
    """Images/s of decoding a folder of 256 x 256 JPEGs into the cache at ``side``, and of reading it back."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        for i in range(count):
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, photo-like content compresses as such
            picture = Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC)
            (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            picture.save(root / f"class{i % 2}" / f"{i}.jpg", quality=90)
        start = time.perf_counter()
        folders.load(root, side, 3, Path(tmp) / "cache")
        decoded = count / (time.perf_counter() - start)
        start = time.perf_counter()
        folders.load(root, side, 3, Path(tmp) / "cache")
        cached = count / (time.perf_counter() - start)
    return decoded, cached


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="the gpu preset's batch (default: 256)")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader variant")
    parser.add_argument("--train-batch", type=int, default=32, help="batch of the timed CPU train step")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--photos", type=int, default=200, help="JPEGs decoded for the folder's one-off rate")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="a GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--gpu-utilisation", type=float, default=0.3, help="assumed share of that peak reached")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    larger = rng.integers(0, 256, (50_000, 36, 36, 3), dtype=np.uint8)
    rows = [
        ("batch, scaled to float32 on the host", loader_rate(plain, args.batch_size, args.batches, on_host=True)),
        ("batch, uint8 (scaled on the device)", loader_rate(plain, args.batch_size, args.batches)),
        ("  + flips", loader_rate(plain, args.batch_size, args.batches, flip=True)),
        ("  + random 32 of 36 crops and flips", loader_rate(larger, args.batch_size, args.batches, "random", True)),
    ]
    cpu_rate, flops = train_step_rate(args.train_batch, args.train_steps)
    gpu_rate = args.gpu_tflops * 1e12 * args.gpu_utilisation / flops
    decoded, cached = decode_rate(args.photos, 32)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__} "
          f"on {jax.devices()[0].platform}; batch {args.batch_size}, one host thread")
    print(f"\n{'loader (host, per step)':42}{'images/s':>12}{'/ CPU step':>12}{'/ GPU need':>12}")
    for name, rate in rows:
        print(f"{name:42}{rate:>12,.0f}{rate / cpu_rate:>11.0f}x{rate / gpu_rate:>11.2f}x")
    print(f"\n{'consumer':42}{'images/s':>12}")
    print(f"{'gpu preset train step, this CPU':42}{cpu_rate:>12,.1f}   ({flops / 1e9:.2f} GFLOP per image)")
    print(f"{'a GPU at the assumed rate':42}{gpu_rate:>12,.0f}   ({args.gpu_tflops:g} TFLOP/s x "
          f"{args.gpu_utilisation:g}: an assumption, not a measurement)")
    print(f"\n{'a folder of 256 x 256 JPEGs, once':42}{decoded:>12,.0f}   decoded to 32 x 32 into the cache")
    print(f"{'the same folder, from its cache':42}{cached:>12,.0f}")


if __name__ == "__main__":
    main()
