"""What the sampling loop costs beyond its network calls, on this machine.

For a network-sized denoiser (a plain-JAX stack of 3x3 convolutions on a batch
of 64 MNIST-sized images, tens of milliseconds a call on a laptop CPU) and
every sampler of the registry, measure:

- call: one compiled denoiser call (timed as NFE calls back to back, the
  network work of one sampling run);
- scan: the whole sampler compiled as one program (lax.scan), and its ratio to
  NFE x call (the target: at most 1.05);
- loop: the same step function, compiled once, driven by a Python loop;
- compile: seconds JAX spent tracing, lowering and compiling during the first
  call of each form (from ``jax.monitoring``'s compile events).

Runs alternate (NFE calls, scan, loop, NFE calls, ...) and the report gives
medians of the per-repeat ratios, so a busy machine slows all three alike. Usage:

    python benchmarks/bench_samplers.py [--steps 20] [--repeats 5] [--samplers ddim,euler]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import samplers
from diffusion.schedules import Schedule

BATCH, SIZE, WIDTH, DEPTH = 64, 28, 32, 4


def init_params(key):
    """A conv stack: 1 -> WIDTH channels, DEPTH - 1 hidden WIDTH -> WIDTH convs, WIDTH -> 1; a time bias per layer."""
    shapes = [(3, 3, 1, WIDTH)] + [(3, 3, WIDTH, WIDTH)] * (DEPTH - 1) + [(3, 3, WIDTH, 1)]
    keys = jax.random.split(key, len(shapes))
    kernels = [jax.random.normal(k, s) / np.sqrt(9 * s[2]) for k, s in zip(keys, shapes)]
    return {"kernels": kernels, "time": jnp.linspace(-1.0, 1.0, WIDTH)}


def network(params, x, t, cond):
    """(x, t, cond) -> prediction, with x of shape (B, 28, 28, 1) and t of shape (B,)."""
    embedding = jnp.sin(t[:, None, None, None] / 1000.0 * params["time"])
    h = x
    for i, kernel in enumerate(params["kernels"]):
        h = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if i < len(params["kernels"]) - 1:
            h = jax.nn.silu(h + embedding)
    return h


def timed(function):
    start = time.perf_counter()
    jax.block_until_ready(function())
    return time.perf_counter() - start


COMPILE_SECONDS = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: COMPILE_SECONDS.append(seconds) if event.startswith("/jax/core/compile/") else None
)


def compile_time(function):
    """Seconds spent compiling while ``function`` runs for the first time."""
    COMPILE_SECONDS.clear()
    timed(function)
    return sum(COMPILE_SECONDS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samplers", default=",".join(samplers.SAMPLERS))
    args = parser.parse_args()

    schedule = Schedule("linear", 1000)
    params = init_params(jax.random.key(0))
    denoiser = jax.tree_util.Partial(network, params)  # weights as arguments, as an NNX model would be
    call = jax.jit(network)
    x_T = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 1))
    t = jnp.full((BATCH,), 500.0)
    key = jax.random.key(2)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"denoiser: {DEPTH + 1} 3x3 convolutions, width {WIDTH}, batch {BATCH} x {SIZE}x{SIZE}x1; "
          f"{args.steps} steps; medians of {args.repeats} alternating repeats")
    timed(lambda: call(params, x_T, t, None))
    header = f"{'sampler':16s} {'NFE':>4s} {'call ms':>8s} {'scan s':>7s} {'scan/NFE·call':>14s} " \
             f"{'loop s':>7s} {'loop/NFE·call':>14s} {'compile scan s':>15s} {'compile loop s':>15s}"
    print(header)
    for name in args.samplers.split(","):
        flow = name.startswith("flow")
        settings = dict(
            sampler=name, schedule=None if flow else schedule, steps=args.steps,
            parameterization="velocity" if flow else "eps", key=key,
        )
        scan = lambda: samplers.sample(denoiser, x_T, **settings).x  # noqa: E731
        loop = lambda: samplers.sample(denoiser, x_T, python_loop=True, **settings).x  # noqa: E731
        compile_scan, compile_loop = compile_time(scan), compile_time(loop)
        nfe = samplers.sample(denoiser, x_T, **settings).nfe
        network_work = lambda: [call(params, x_T, t, None) for _ in range(nfe)]  # noqa: E731
        calls, scans, loops = [], [], []
        for _ in range(args.repeats):
            calls.append(timed(network_work))
            scans.append(timed(scan))
            loops.append(timed(loop))
        c, s, lo = statistics.median(calls) / nfe, statistics.median(scans), statistics.median(loops)
        scan_ratio = statistics.median(sc / ca for sc, ca in zip(scans, calls))
        loop_ratio = statistics.median(lp / ca for lp, ca in zip(loops, calls))
        print(f"{name:16s} {nfe:4d} {1000 * c:8.1f} {s:7.3f} {scan_ratio:14.3f} {lo:7.3f} {loop_ratio:14.3f} "
              f"{compile_scan:15.2f} {compile_loop:15.2f}", flush=True)


if __name__ == "__main__":
    main()
