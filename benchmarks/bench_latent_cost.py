"""What the latent space buys: train steps and sampling of the latent preset against the pixel one, side by side.

    .venv/bin/python benchmarks/bench_latent_cost.py [--autoencoder runs/autoencoder] [--rounds 5] [--calls 20]

Compiles ``training.make_train_step`` for the ``cpu`` preset (the U-Net on
28×28×1 pixels), the ``latent`` preset (a U-Net on the 7×7×4 latents of the
autoencoder run ``--autoencoder``, which only decides the shapes here), the
``autoencoder`` preset, and the text models in pixels and in latents (``text``,
``latent-text``), then times them in alternating rounds of ``--calls``
steps on fixed batches, so that the machine's drift falls on all alike. Then
the same for sampling: 64 images by DDIM in 25 steps, the latent model's
including the one decode at the end. Prints images per second (median of the
rounds), ratios, and the temporary memory XLA allocates for each compiled
train step (``memory_analysis``).
"""

import argparse
import statistics
import sys
import time

from diffusion import cpu

cpu.configure()  # the XLA flag train.py trains with, before JAX starts
if __name__ == "__main__":
    cpu.restart_with_huge_pages()  # as train.py does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion import data, runs, samplers, training  # noqa: E402
from diffusion.configs import LatentConfig  # noqa: E402
from diffusion.unet import as_denoiser  # noqa: E402


def compiled_step(config):
    """(config, compiled step, state, x, cond, temporary bytes) for one run's config, on fixed inputs."""
    mesh = training.make_mesh()
    graphdef, state = training.init_state(config)
    space = runs.load_latent_space(config, config.run_dir) if isinstance(config, LatentConfig) else None
    images, labels = training.load_training_data(config, space)
    x = images[: config.batch_size]
    x = x if isinstance(config, LatentConfig) else data.to_model_range(x)
    cond = training.conditions(config, labels[: config.batch_size], 0)
    x, cond, state = training.put_batch(mesh, x), training.put_batch(mesh, cond), training.put_state(mesh, state)
    step = training.make_train_step(config, graphdef, mesh).lower(state, x, cond).compile()
    memory = step.memory_analysis()
    return [config, step, state, x, cond, getattr(memory, "temp_size_in_bytes", 0)]


def sampling_program(config, space):
    """A function that draws 64 images of class 3 with DDIM in 25 steps (and decodes them, for a latent run)."""
    model = runs.make_model(config, nnx.Rngs(0))
    denoiser, parameterization = as_denoiser(model)
    shape = (64, config.unet.image_size, config.unet.image_size, config.unet.in_channels)
    x_T, cond = jax.random.normal(jax.random.key(0), shape), jnp.full((64,), 3)

    def draw():
        x = samplers.sample(denoiser, x_T, sampler="ddim", steps=25, schedule=config.noise_schedule,
                            parameterization=parameterization, cond=cond).x
        return x if space is None else space.decode(x)

    return draw


def alternate(programs: dict, rounds: int, calls: int, per_call: dict) -> dict:
    """Median images/s of each program over ``rounds`` alternating rounds of ``calls`` calls."""
    rates = {name: [] for name in programs}
    for _ in range(rounds):
        for name, run in programs.items():
            jax.block_until_ready(run())  # warm
            started = time.perf_counter()
            for _ in range(calls):
                out = run()
            jax.block_until_ready(out)
            rates[name].append(calls * per_call[name] / (time.perf_counter() - started))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", default="runs/autoencoder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    configs = {
        "pixel (cpu preset)": runs.start_config("cpu"),
        "latent preset": runs.start_config("latent", autoencoder=args.autoencoder),
        "autoencoder preset": runs.start_config("autoencoder"),
        "text preset": runs.start_config("text"),
        "latent-text preset": runs.start_config("latent-text", autoencoder=args.autoencoder),
    }
    steps = {name: compiled_step(config) for name, config in configs.items()}

    def stepper(name):
        def run():
            entry = steps[name]
            entry[2], metrics = entry[1](entry[2], entry[3], entry[4])
            return metrics

        return run

    train = alternate({n: stepper(n) for n in steps}, args.rounds, args.calls,
                      {n: c.batch_size for n, c in configs.items()})
    pixel, latent_name = "pixel (cpu preset)", "latent preset"
    space = runs.load_latent_space(configs[latent_name], configs[latent_name].run_dir)
    draws = {pixel: sampling_program(configs[pixel], None), latent_name: sampling_program(configs[latent_name], space)}
    sampling = alternate(draws, max(1, args.rounds // 2), 2, {n: 64 for n in draws})

    print(f"train step, {args.rounds} alternating rounds of {args.calls} steps (images/s; XLA temporary memory):")
    for name, config in configs.items():
        ratio = train[name] / train[pixel]
        print(f"  {name:20s} batch {config.batch_size:3d}: {train[name]:6.0f} images/s ({ratio:.2f}× pixel)"
              f"   {steps[name][5] / 2**20:6.1f} MiB")
    print("sampling, 64 images of one class, DDIM 25 steps:")
    for name in draws:
        extra = " (decode included)" if name == latent_name else ""
        print(f"  {name:20s}: {sampling[name]:6.1f} images/s ({sampling[name] / sampling[pixel]:.2f}× pixel){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
