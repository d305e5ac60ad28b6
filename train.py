"""Train a diffusion U-Net: ``python train.py [--preset tiny|cpu|gpu] [--field value ...]``.

Every field of ``diffusion.training.Config`` is a flag (``--learning-rate 1e-3``,
``--channel-mult 1,2,2``, ``--resume``); flags override the preset. Examples:

    python train.py                          # the cpu preset: digits in ~7 minutes on 2 cores
    python train.py --preset tiny --name t   # seconds, for a first look
    python train.py --name default --resume  # continue a run from its last checkpoint
    python train.py --preset gpu --dataset fashion-mnist

The run folder ``runs/<name>/`` receives checkpoints, metrics.jsonl and loss.png.
"""

import os

# Let XLA:CPU run each convolution on all cores (by default it uses one); set
# before JAX is imported. See docs/training.md for the measured speed-up.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}".strip()

import sys  # noqa: E402

# glibc's transparent-huge-page tunable: the train step's temporary buffer
# (172 MB at the default batch, allocated afresh by XLA on every call) then
# lives on 2 MiB pages instead of 4 KiB ones, which most likely spares the
# strided transposes of the backward pass their TLB misses (the steps get
# 12-20 % faster on the 2-core CPU, see docs/training.md). glibc reads
# GLIBC_TUNABLES only when a process starts, so the script restarts itself
# once with it set.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages():
    """Replace this process by the same command with ``GLIBC_TUNABLES`` set to ``HUGE_PAGES`` (Linux only).

    Does nothing if ``GLIBC_TUNABLES`` is already set (to anything, even
    empty: that is how to opt out) or on another system. A C library other
    than glibc ignores the variable; a kernel with transparent huge pages
    switched off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never)
    makes it a no-op. The process keeps its id, arguments and interpreter options.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


if __name__ == "__main__":
    restart_with_huge_pages()

import argparse  # noqa: E402
import dataclasses  # noqa: E402

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
