"""Train a diffusion U-Net: ``python train.py [--preset tiny|cpu|gpu] [--field value ...]``.

Every field of ``diffusion.training.Config`` is a flag (``--learning-rate 1e-3``,
``--channel-mult 1,2,2``, ``--resume``); flags override the preset. Examples:

    python train.py                          # the cpu preset: digits on a laptop in ~15 minutes
    python train.py --preset tiny --name t   # seconds, for a first look
    python train.py --name default --resume  # continue a run from its last checkpoint
    python train.py --preset gpu --dataset fashion-mnist

The run folder ``runs/<name>/`` receives checkpoints, metrics.jsonl and loss.png.
"""

import os

# Let XLA:CPU run each convolution on all cores (by default it uses one); set
# before JAX is imported. See docs/training.md for the measured speed-up.
_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402

from diffusion import data, training  # noqa: E402


def _flag_type(field):
    """How to read a field's value from the command line: ints, floats, strings, and comma-separated tuples."""
    default = field.default
    if isinstance(default, tuple):
        return lambda text: tuple(int(v) for v in text.split(",") if v.strip())
    return type(default)


def parse_flags(argv=None) -> training.Config:
    """The Config that the command line asks for (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=training.PRESETS,
        help="starting point (default: cpu); flags override its fields",
    )
    for field in dataclasses.fields(training.Config):
        flag, shown = "--" + field.name.replace("_", "-"), field.default
        shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
        kind = (
            dict(action=argparse.BooleanOptionalAction)
            if isinstance(field.default, bool)
            else dict(type=_flag_type(field))
        )
        parser.add_argument(flag, default=argparse.SUPPRESS, help=f"cpu preset: {shown}", **kind)
    overrides = vars(parser.parse_args(argv))
    return training.make_config(overrides.pop("preset"), **overrides)


def main(argv=None) -> int:
    try:
        config = parse_flags(argv)
        state = training.train(config)
    except (training.ConfigError, data.DataError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if int(state.step) >= config.steps else 130  # 130: stopped by Ctrl-C (after saving)


if __name__ == "__main__":
    sys.exit(main())
