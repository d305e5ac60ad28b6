"""Measure the quality of a checkpoint's digits: ``python evaluate.py [--checkpoint runs/default] [options]``.

Generates n digits (default 1,000: seeds 0..99, each drawn once per class, so
100 per class) with the given sampler, steps and guidance, and judges them with
``diffusion.metrics.evaluate_digits`` against the 1,000 held-out real digits:
classifier accuracy, classifier FID beside its real-vs-real floor (the score
of a perfect generator at this n), precision and recall. Examples:

    python evaluate.py                                  # DDIM 25 steps, guidance 3
    python evaluate.py --sampler dpmpp_2m_karras --steps 10 --json
    python evaluate.py --n 200 --guidance 1             # a quick look, unguided
"""

import json
import sys
import time

from diffusion import classifier, data, generate, metrics, samplers
from sample import DEFAULT_CHECKPOINT, UsageError, sampling_flags

DIGIT_DATASETS = ("mnist-embedded", "mnist")  # what the metrics' classifier knows


def parse_args(argv=None):
    parser = sampling_flags(__doc__)
    parser.add_argument(
        "--n", type=int, default=1000, help="digits to generate, a multiple of the classes (default: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument("--reference", choices=metrics.REFERENCES, default="test", help="real digits to compare with")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def settings_from_args(args) -> generate.Settings:
    """n digits, seeds counting up from --seed, each drawn once per class; the sampling flags over the defaults."""
    checkpoint = generate.open_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    config = checkpoint.config
    if config.dataset not in DIGIT_DATASETS or (config.image_size, config.in_channels) != (28, 1):
        raise UsageError(
            f"evaluate.py judges 28×28 MNIST digits; this checkpoint makes {config.image_size}×{config.image_size}×"
            f"{config.in_channels} images of {config.dataset}"
        )
    classes = max(config.num_classes, 1)
    if args.n < 4 or args.n % classes:
        raise UsageError(f"--n must be at least 4 and a multiple of the {classes} classes (got {args.n})")
    chosen = {k: getattr(args, k) for k in ("sampler", "steps", "spacing", "guidance", "batch_size")}
    seeds = tuple(range(args.seed, args.seed + args.n // classes))
    return generate.default_settings(checkpoint, seeds=seeds, **{k: v for k, v in chosen.items() if v is not None})


def evaluate(settings: generate.Settings, reference: str) -> dict:
    """Generate the digits of ``settings`` and measure them: the settings that matter, the metrics and the times."""
    started = time.perf_counter()
    generation = generate.generate(settings, progress=True)
    sampled = time.perf_counter()
    labels = None if generation.labels[0] is None else list(generation.labels)
    results = metrics.evaluate_digits(generation.images, labels, reference=reference)
    return {
        "checkpoint": settings.checkpoint,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "spacing": settings.spacing or samplers.SAMPLERS[settings.sampler].spacing,  # None for flow samplers
        "guidance": settings.guidance,
        "first_seed": settings.seeds[0],
        "reference": reference,
        **results,
        "nfe": generation.nfe,
        "sampling_s": sampled - started,
        "metrics_s": time.perf_counter() - sampled,
    }


def table(row: dict) -> str:
    """The results as a small text table, each generated figure beside what real digits score."""

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("", "generated", "real digits"),
        ("accuracy", number(row["accuracy"]), "-"),
        ("classifier FID", number(row["fid"], 2), f"{row['floor']:.2f} ± {row['floor_std']:.2f}"),
        ("precision", number(row["precision"]), number(row["floor_precision"])),
        ("recall", number(row["recall"]), number(row["floor_recall"])),
    ]
    header = (
        f"{row['checkpoint']}: {row['sampler']} ({row['spacing'] or 'flow'} timesteps), {row['steps']} steps, "
        f"guidance {row['guidance']:g}, "
        f"{row['nfe']} network calls per digit"
    )
    footer = (
        f"n = {row['n']} against the {row['reference']} digits; sampling {row['sampling_s']:.1f} s "
        f"({row['n'] / row['sampling_s']:.1f} digits/s), metrics {row['metrics_s']:.1f} s"
    )
    return "\n".join([header, "", *(f"{name:16}{ours:>12}{real:>16}" for name, ours, real in rows), "", footer])


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        row = evaluate(settings_from_args(args), args.reference)
    except (ValueError, OSError, data.DataError, classifier.ClassifierError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(row) if args.json else table(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
