"""Measure the U-Net of a training preset: parameters, FLOPs per image, train-step speed, share of peak.

    .venv/bin/python benchmarks/bench_unet.py [--preset cpu] [--rounds 2]

Prints one table. FLOPs come from XLA's own cost analysis of the compiled
programs (forward pass, and the whole train step: forward, backward, AdamW,
EMA). The machine's fp32 matmul peak is measured here too, with NumPy and with
a jitted ``jnp.dot`` (2048 × 2048), so that "% of peak" is against this
machine, not a data sheet.

XLA_FLAGS and GLIBC_TUNABLES must be set before the process starts, so each
configuration (XLA's defaults; the XLA flag train.py sets; that flag and the
huge-page tunable train.py restarts itself with) is measured in its own child
process; rounds alternate between them, since the machine's speed drifts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from diffusion.cpu import HUGE_PAGES, YNN_FLAG  # the settings train.py runs with

# The environment of each measured configuration; the last one is what train.py runs with.
VARIANTS = {
    "XLA defaults": {"XLA_FLAGS": "", "GLIBC_TUNABLES": ""},
    f"`{YNN_FLAG}`": {"XLA_FLAGS": YNN_FLAG, "GLIBC_TUNABLES": ""},
    f"that flag + `GLIBC_TUNABLES={HUGE_PAGES}` (train.py)": {"XLA_FLAGS": YNN_FLAG, "GLIBC_TUNABLES": HUGE_PAGES},
}


def best_seconds(fn, repeats):
    """The fastest of ``repeats`` calls of fn (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(preset: str, batch_size: int | None, repeats: int) -> dict:
    """Run in a child process: every number for one configuration."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from diffusion import configs, training

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    numpy_peak = 2 * n**3 / best_seconds(lambda: a @ a, repeats)
    dot = jax.jit(jnp.dot)
    a_jax = jnp.asarray(a)
    jax_peak = 2 * n**3 / best_seconds(lambda: dot(a_jax, a_jax).block_until_ready(), repeats)

    overrides = {"batch_size": batch_size} if batch_size else {}
    config = configs.make_config(preset, **overrides)
    graphdef, state = training.init_state(config)
    mesh = training.make_mesh(1)
    state = training.put_state(mesh, state)
    B = config.batch_size
    x = (
        np.random.default_rng(1)
        .uniform(-1, 1, (B, config.image_size, config.image_size, config.in_channels))
        .astype(np.float32)
    )
    y = np.arange(B, dtype=np.int32) % max(config.num_classes, 1)
    x, y = training.put_batch(mesh, x), training.put_batch(mesh, y)

    def forward(params, x, t, y):
        return nnx.merge(graphdef, params)(x, t, y if config.num_classes else None)

    t = jnp.full((B,), 500.0)
    fwd = jax.jit(forward).lower(state.params, x, t, y).compile()
    start = time.perf_counter()
    step = training.make_train_step(config, graphdef, mesh).lower(state, x, y).compile()
    compile_s = time.perf_counter() - start

    def cost(compiled):
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    fwd_s = best_seconds(lambda: fwd(state.params, x, t, y).block_until_ready(), repeats)
    holder = [state]

    def one_step():
        holder[0], metrics = step(holder[0], x, y)
        metrics["loss"].block_until_ready()

    step_s = best_seconds(one_step, repeats)
    return {
        "params": int(sum(p.size for p in jax.tree.leaves(state.params))),
        "batch": B,
        "forward_flops_per_image": cost(fwd) / B,
        "step_flops_per_image": cost(step) / B,
        "forward_s": fwd_s,
        "step_s": step_s,
        "compile_s": compile_s,
        "numpy_peak": numpy_peak,
        "jax_dot_peak": jax_peak,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.batch_size, args.repeats)))
        return

    results = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variables in VARIANTS.items():
            env = {**os.environ, **variables}
            cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--repeats", str(args.repeats)]
            cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))

    def median(key, runs=None):
        return statistics.median(r[key] for rs in (runs or results.values()) for r in rs)

    first = next(iter(results.values()))[0]
    peak = median("numpy_peak")
    print(f"preset {args.preset}: {first['params']:,} parameters, batch {first['batch']}, {os.cpu_count()} CPU cores")
    print(
        f"FLOPs per image (XLA cost analysis): forward {first['forward_flops_per_image'] / 1e6:.1f} M, "
        f"train step {first['step_flops_per_image'] / 1e6:.1f} M"
    )
    print(
        f"fp32 matmul peak (2048², best of {args.repeats}): NumPy {peak / 1e9:.0f} GFLOP/s, "
        f"jitted jnp.dot {median('jax_dot_peak') / 1e9:.0f} GFLOP/s\n"
    )
    print("| settings | train step s | images/s | steps/s | % of NumPy peak | forward s | compile s |")
    print("|---|---|---|---|---|---|---|")
    step_s = {name: median("step_s", [rs]) for name, rs in results.items()}
    for name, rs in results.items():
        share = first["step_flops_per_image"] * first["batch"] / step_s[name] / peak
        cells = [
            f"{step_s[name]:.3f}",
            f"{first['batch'] / step_s[name]:.0f}",
            f"{1 / step_s[name]:.2f}",
            f"{100 * share:.0f} %",
            f"{median('forward_s', [rs]):.3f}",
            f"{median('compile_s', [rs]):.1f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    default = step_s["XLA defaults"]
    speedups = ", ".join(f"{default / s:.2f}x" for s in list(step_s.values())[1:])
    print(f"\nspeed-up of the train step over XLA's defaults, in the order of the table: {speedups}")


if __name__ == "__main__":
    main()
