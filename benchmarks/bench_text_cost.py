"""What reading a prompt costs: the train step of the text preset against the label preset, side by side.

    .venv/bin/python benchmarks/bench_text_cost.py [--rounds 5] [--calls 20]

Compiles ``training.make_train_step`` for the ``cpu`` preset (class labels) and
the ``text`` preset (the same U-Net with cross-attention and a text encoder,
token ids for conditions), then times them in alternating rounds of
``--calls`` steps on fixed batches, so that the machine's drift falls on both
alike. Prints images per second (median of the rounds) and their ratio. The
captions of a real run are drawn on the host between steps
(``training.conditions``); that is timed separately, per batch.
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

from diffusion import configs, data, training  # noqa: E402


def compiled_step(preset: str):
    """(config, compiled step, state, x, cond) for one preset, on fixed inputs."""
    config = configs.make_config(preset)
    mesh = training.make_mesh()
    graphdef, state = training.init_state(config)
    images, rows = training.load_training_data(config)
    x = data.to_model_range(images[: config.batch_size])
    cond = training.conditions(config, rows[: config.batch_size], 0)
    x, cond, state = training.put_batch(mesh, x), training.put_batch(mesh, cond), training.put_state(mesh, state)
    step = training.make_train_step(config, graphdef, mesh).lower(state, x, cond).compile()
    return config, step, state, x, cond


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    runs = {preset: compiled_step(preset) for preset in ("cpu", "text")}
    rates = {preset: [] for preset in runs}
    for _ in range(args.rounds):
        for preset, (config, step, state, x, cond) in runs.items():
            state, metrics = step(state, x, cond)  # warm, and keep the donated state alive
            jax.block_until_ready(metrics)
            started = time.perf_counter()
            for _ in range(args.calls):
                state, metrics = step(state, x, cond)
            jax.block_until_ready(metrics)
            rates[preset].append(args.calls * config.batch_size / (time.perf_counter() - started))
            runs[preset] = (config, step, state, x, cond)
    text_config = runs["text"][0]
    _, rows = training.load_training_data(text_config)
    started = time.perf_counter()
    for k in range(50):
        training.conditions(text_config, rows[: text_config.batch_size], k)
    captions_ms = (time.perf_counter() - started) / 50 * 1e3
    label, text = (statistics.median(rates[p]) for p in ("cpu", "text"))
    print(f"train step, batch {text_config.batch_size}, {args.rounds} alternating rounds of {args.calls} steps:")
    print(f"  cpu preset (labels):          {label:6.0f} images/s")
    print(f"  text preset (cross-attention): {text:6.0f} images/s   ({text / label:.2f}× the label model)")
    print(f"  captions and tokens on the host: {captions_ms:.1f} ms per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
