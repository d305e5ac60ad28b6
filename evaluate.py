"""Measure the quality of a checkpoint's digits: ``python evaluate.py [--checkpoint runs/default] [options]``.

Generates n digits (default 1,000: seeds 0..99, each drawn once per class, so
100 per class) with the given sampler, steps and guidance, and judges them
against the 1,000 held-out real digits (``diffusion.evaluation``): classifier
accuracy, classifier FID beside its real-vs-real floor (the score of a perfect
generator at this n), precision and recall. A model of other images (CIFAR-10,
a folder: --dataset folder:PATH) is judged by the sliced Wasserstein distance of
its pixels to real images, beside the same for real ones; not Inception FID. Examples:

    python evaluate.py                                  # DDIM 25 steps, guidance 1.75 in sigma 0.28-5.42
    python evaluate.py --sampler dpmpp_2m_karras --steps 10 --json
    python evaluate.py --n 200 --guidance 1             # a quick look, unguided
"""

import json
import sys

from diffusion import cli, evaluation, metrics, runs


def parse_args(argv=None):
    parser = cli.sampling_flags(__doc__)
    parser.add_argument(
        "--n", type=int, default=1000, help="digits to generate, a multiple of the classes (default: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument("--reference", choices=metrics.REFERENCES, default="test", help="real digits to compare with")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = runs.open_checkpoint(args.checkpoint or runs.DEFAULT_RUN)
    chosen = {
        k: getattr(args, k) for k in ("sampler", "steps", "spacing", "shift", "guidance", "guidance_interval", "batch_size")
    }
    settings = evaluation.digit_settings(
        checkpoint, args.n, args.seed, **{k: v for k, v in chosen.items() if v is not None}
    )
    row = evaluation.evaluate(settings, args.reference, checkpoint)
    print(json.dumps(row) if args.json else evaluation.table(row))
    return 0


def main(argv=None) -> int:
    """The exit status: 0 when done, 2 for bad input (one line on stderr; see ``cli.run_main``)."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
