"""Where the train step's gap to PyTorch lies: the backward pass with and without the convolutions' filter gradients.

    .venv/bin/python benchmarks/bench_filter_grad.py [--preset cpu] [--batch-size B] [--rounds 7]

Times, for the same U-Net and weights in JAX (jitted) and in eager PyTorch
(``benchmarks/torch_unet.py``, channels_last), alternating in rounds:

- the forward pass of a plain loss, mean((model(x, t, y) - x)²);
- its gradient with respect to every parameter;
- its gradient with respect to every parameter except the convolution
  kernels (their filter gradients, dL/dW, are then not computed; the gradients
  flowing back through the activations still are).

The difference between the last two is what the filter gradients cost in
each framework. Prints milliseconds per call, medians over the rounds. Needs
PyTorch (``make bench`` installs it).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from diffusion import cpu

cpu.configure()  # the XLA flag train.py trains with, before JAX starts
if __name__ == "__main__":
    cpu.restart_with_huge_pages()  # as train.py does (PyTorch's side gets the same)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion import configs, runs  # noqa: E402


def jax_programs(model, x, t, y):
    """Compiled forward, full gradient and gradient without conv kernels, as no-argument callables."""
    graphdef, params = nnx.split(model)
    flat = nnx.to_flat_state(params)
    kernels = {path: v for path, v in flat if v.get_value().ndim == 4}  # conv kernels: (kh, kw, in, out)
    others = {path: v for path, v in flat if v.get_value().ndim != 4}

    def loss(kernels, others):
        model = nnx.merge(graphdef, nnx.from_flat_state({**kernels, **others}))
        return jnp.mean((model(x, t, y) - x) ** 2)

    forward = jax.jit(loss)
    full = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    without = jax.jit(jax.value_and_grad(loss, argnums=1))
    return {
        "forward": lambda: jax.block_until_ready(forward(kernels, others)),
        "gradient": lambda: jax.block_until_ready(full(kernels, others)),
        "gradient without filter gradients": lambda: jax.block_until_ready(without(kernels, others)),
    }


def torch_programs(model, x, t, y):
    """The same three computations on the eager PyTorch twin."""
    import torch

    import torch_unet

    twin = torch_unet.from_flax(model).to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    t = torch.from_numpy(np.array(t))
    y = None if y is None else torch.from_numpy(np.array(y))
    kernels = [p for p in twin.parameters() if p.ndim == 4]

    def forward():
        with torch.no_grad():
            ((twin(x, t, y) - x) ** 2).mean()

    def gradient(filter_gradients):
        for p in kernels:
            p.requires_grad_(filter_gradients)
        twin.zero_grad(set_to_none=True)
        ((twin(x, t, y) - x) ** 2).mean().backward()

    return {
        "forward": forward,
        "gradient": lambda: gradient(True),
        "gradient without filter gradients": lambda: gradient(False),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=configs.PRESETS)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (the medians are reported)")
    parser.add_argument("--calls", type=int, default=5, help="calls per timing")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: `make bench` installs it (requirements-bench.txt), then run this again.")
        return 1
    torch.set_num_threads(os.cpu_count())  # one thread per core, as bench_train.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    config = configs.make_config(args.preset, **overrides)
    model = runs.make_model(config, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    B, size = config.batch_size, config.image_size
    x = jnp.asarray(rng.standard_normal((B, size, size, config.in_channels), dtype=np.float32))
    t = jnp.asarray(rng.uniform(0, config.num_timesteps - 1, B).astype(np.float32))
    y = jnp.asarray(np.arange(B) % config.num_classes) if config.num_classes else None
    programs = {"JAX": jax_programs(model, x, t, y), "PyTorch": torch_programs(model, x, t, y)}

    for framework in programs.values():  # compile, warm up
        for run in framework.values():
            run()
            run()
    times = {(f, name): [] for f, framework in programs.items() for name in framework}
    for _ in range(args.rounds):
        for (f, name), rounds in times.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                programs[f][name]()
            rounds.append((time.perf_counter() - start) / args.calls * 1e3)

    print(
        f"preset {args.preset}, batch {B}, {torch.get_num_threads()} PyTorch threads; "
        f"ms per call, median of {args.rounds} rounds"
    )
    print("\n| | JAX ms | PyTorch ms | JAX / PyTorch time |")
    print("|---|---|---|---|")
    median = {key: statistics.median(rounds) for key, rounds in times.items()}
    for name in programs["JAX"]:
        jax_ms, torch_ms = median["JAX", name], median["PyTorch", name]
        print(f"| {name} | {jax_ms:.1f} | {torch_ms:.1f} | {jax_ms / torch_ms:.2f} |")
    for f in programs:
        cost = median[f, "gradient"] - median[f, "gradient without filter gradients"]
        print(f"\n{f}: the filter gradients cost {cost:.1f} ms of the {median[f, 'gradient']:.1f} ms gradient", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
