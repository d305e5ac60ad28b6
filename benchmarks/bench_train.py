"""Side by side: the project's train step and sampler forward pass against the same U-Net in eager PyTorch.

    .venv/bin/python benchmarks/bench_train.py [--preset cpu] [--batch-size B] [--rounds 5] [--calls 5]
    make bench        # installs PyTorch (requirements-bench.txt) into .venv first

JAX side: the compiled train step of ``train.py`` (``training.make_train_step``
on a one-device mesh, with the XLA flag that train.py sets), and the compiled
forward pass that the samplers call (``diffusion.unet.as_denoiser``). PyTorch
side: the twin of ``benchmarks/torch_unet.py``, eager, with the same weights,
one thread per core, channels_last memory format (``--no-channels-last`` for
NCHW; on the 2-core machine the two measured within 5 % of each other), the
forward pass under ``torch.inference_mode``; its train step does the same work
(label dropout, v / eps / x0 loss with min-SNR weighting, backward, clipping,
fused AdamW, EMA).

After a warm-up, each round times ``--calls`` calls of: the JAX train step,
the PyTorch train step, the JAX forward pass, the PyTorch forward pass; the
machine's speed drifts, so they alternate. Prints images/s per round, the
medians, their ratio JAX / PyTorch (> 1: JAX is faster), and GFLOP/s from
XLA's cost analysis of the compiled programs (the same count for both: it is
the same network). The forward pass runs at the training batch, which is what
a guided sampler computes for half as many images. Without PyTorch, prints how
to install it and exits.
"""

import argparse
import os
import statistics
import time

from diffusion import cpu

cpu.configure()  # the XLA flag train.py trains with, before JAX starts
if __name__ == "__main__":
    cpu.restart_with_huge_pages()  # as train.py does (PyTorch's side gets the same)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion import configs, training  # noqa: E402
from diffusion.unet import as_denoiser  # noqa: E402


def flops(compiled) -> float:
    """The floating-point operations of a compiled JAX program, by XLA's cost analysis."""
    return compiled.cost_analysis()["flops"]


def images_per_second(run, calls: int, batch: int) -> float:
    """Time ``run(calls)`` (which returns once its work is done): images per second."""
    start = time.perf_counter()
    run(calls)
    return calls * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=configs.PRESETS)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (the medians are reported)")
    parser.add_argument("--calls", type=int, default=5, help="calls per timing, for each of the four measurements")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PyTorch's memory format: channels_last (default) or plain NCHW; the two measured within 5 %% here",
    )
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed; `.venv/bin/pip install -r requirements-bench.txt` (or `make bench`) adds it")
        return
    import torch_unet

    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    config = configs.make_config(args.preset, **overrides)
    B, size, channels = config.batch_size, config.image_size, config.in_channels
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, size, size, channels)).astype(np.float32)
    labels = rng.integers(0, max(config.num_classes, 1), B).astype(np.int32)
    t = rng.uniform(0, config.num_timesteps - 1, B).astype(np.float32)

    # JAX: the train step exactly as train.py runs it, and the samplers' denoiser.
    graphdef, state = training.init_state(config)
    mesh = training.make_mesh(1)
    state = training.put_state(mesh, state)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), state.params))  # the step donates state.params
    x_jax, labels_jax = training.put_batch(mesh, x), training.put_batch(mesh, labels)
    step = training.make_train_step(config, graphdef, mesh).lower(state, x_jax, labels_jax).compile()
    denoiser, _ = as_denoiser(model)
    sample_inputs = jax.device_put((x, t, labels if config.num_classes else None))
    forward_program = jax.jit(lambda d, inputs: d(*inputs)).lower(denoiser, sample_inputs).compile()
    flops_per_image = {"train": flops(step) / B, "forward": flops(forward_program) / B}

    # PyTorch: the twin, with the same weights, NCHW images in the chosen memory format.
    torch.set_num_threads(os.cpu_count())
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    twin = torch_unet.from_flax(model).to(memory_format=memory_format)
    sampler_twin = torch_unet.from_flax(model).to(memory_format=memory_format).eval()
    trainer = torch_unet.TrainStep(twin, config)
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(memory_format=memory_format)
    labels_torch, t_torch = torch.from_numpy(labels).long(), torch.from_numpy(t)
    cond_torch = labels_torch if config.num_classes else None

    def jax_train(calls):
        nonlocal state
        for _ in range(calls):
            state, metrics = step(state, x_jax, labels_jax)
        jax.block_until_ready(metrics)

    def torch_train(calls):
        for _ in range(calls):
            trainer(x_torch, *trainer.draw(x_torch, labels_torch))

    def jax_forward(calls):
        for _ in range(calls):
            denoiser(*sample_inputs).block_until_ready()

    @torch.inference_mode()
    def torch_forward(calls):
        for _ in range(calls):
            sampler_twin(x_torch, t_torch, cond_torch)

    runs = {
        "train": {"JAX": jax_train, "PyTorch": torch_train},
        "forward": {"JAX": jax_forward, "PyTorch": torch_forward},
    }
    for by_framework in runs.values():
        for run in by_framework.values():
            run(2)  # warm-up: compiling, allocators, thread pools
    speeds = {(what, who): [] for what, by_framework in runs.items() for who in by_framework}
    for _ in range(args.rounds):
        for what, by_framework in runs.items():
            for who, run in by_framework.items():
                speeds[what, who].append(images_per_second(run, args.calls, B))
    median = {key: statistics.median(values) for key, values in speeds.items()}

    params = sum(p.size for p in jax.tree.leaves(state.params))
    print(
        f"preset {args.preset}: {params / 1e6:.2f} M parameters, batch {B}, {os.cpu_count()} CPU cores; "
        f"JAX {jax.__version__} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')!r}); PyTorch {torch.__version__} eager, "
        f"{torch.get_num_threads()} threads, {'channels_last' if args.channels_last else 'contiguous (NCHW)'}; "
        f"{args.rounds} rounds of {args.calls} calls\n"
    )
    print("| round | train JAX img/s | train PyTorch img/s | forward JAX img/s | forward PyTorch img/s |")
    print("|---|---|---|---|---|")
    for i in range(args.rounds):
        print(f"| {i + 1} | " + " | ".join(f"{values[i]:.0f}" for values in speeds.values()) + " |")
    print("| median | " + " | ".join(f"{m:.0f}" for m in median.values()) + " |\n")

    print("| | FLOPs / image (XLA) | JAX GFLOP/s | PyTorch GFLOP/s | JAX / PyTorch |")
    print("|---|---|---|---|---|")
    for what in runs:
        jax_speed, torch_speed = median[what, "JAX"], median[what, "PyTorch"]
        gflops = [f"{flops_per_image[what] * s / 1e9:.1f}" for s in (jax_speed, torch_speed)]
        cells = [f"{flops_per_image[what] / 1e6:.1f} M", *gflops, f"{jax_speed / torch_speed:.2f}x"]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
