"""Look for a Tree-Ring watermark in images: ``python detect.py IMAGE [IMAGE ...] --watermark-key SEED``.

Each image is inverted with DDIM to the noise it would have come from, and that noise's distance to the key is
compared with the distances of unmarked images (``--null`` generations of the same model, inverted alike):
the p-value is the share of them that lie as close (``diffusion.watermark``), so a small one says the key is
there. The chi-squared p-value of Tree-Ring's paper is shown beside it; it assumes the inversion exact, which it
is not (docs/watermarks.md measures how far off it is). A grid written by sample.py is split into its
images; its settings name the checkpoint that made it, which is then the default. Give the same key flags as
sample.py was given. Examples:

    python sample.py --watermark-key 1234 --seed 0-3 --label 7 --out marked.png
    python detect.py marked.png --watermark-key 1234            # p-values far below 0.01: marked
    python detect.py marked.png --watermark-key 99              # another key: not found
    python detect.py digit.png --checkpoint runs/default --watermark-key 1234 --steps 100 --json
"""

import argparse
import json
import sys

from diffusion import cli, generate, pictures, runs, watermark
from diffusion.errors import GenerationError, UsageError


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("images", nargs="+", metavar="IMAGE", help="PNG files: single pictures or grids written by sample.py")
    flag("--checkpoint", help=f"the model that made the images (default: the one a PNG names, else {runs.DEFAULT_RUN})")
    flag("--steps", type=int, default=watermark.DEFAULT_DETECTION_STEPS, help=f"DDIM inversion steps (default: {watermark.DEFAULT_DETECTION_STEPS})")
    flag("--alpha", type=float, default=0.01, help="call an image marked if its p-value is below this (default 0.01)")
    flag("--null", type=int, default=200, help="unmarked generations for the p-value's null (default: 200; "
         "0: the chi-squared p-value only)")
    flag("--json", action="store_true", help="one JSON object per image instead of a line of text")
    cli.watermark_flags(parser)
    return parser.parse_args(argv)


def _maker(path):
    """The settings saved in a PNG written by sample.py, or None for any other image."""
    return generate.read_settings(path) if pictures.png_text(path, generate.PNG_KEY) is not None else None


def run(argv=None) -> int:
    args = parse_args(argv)
    key = cli.watermark_key(args)
    if key is None:
        raise UsageError("give the key to look for: --watermark-key SEED (and the pattern, radius and channel flags "
                         "if sample.py was given them)")
    if args.null < 0:
        raise UsageError(f"--null is a number of generations, 0 or more (got {args.null})")
    if not 0.0 < args.alpha < 1.0:
        raise UsageError(f"--alpha is a probability between 0 and 1 (got {args.alpha})")
    made_by = {path: _maker(path) for path in args.images}
    named = {s.checkpoint for s in made_by.values() if s is not None}
    checkpoint = runs.open_checkpoint(args.checkpoint or (named.pop() if len(named) == 1 else runs.DEFAULT_RUN))
    loaded = runs.load(checkpoint)
    watermark.check_detectable(loaded.config)
    size, channels = loaded.config.image_size, loaded.config.in_channels
    for path, settings in made_by.items():
        if settings is not None and settings.checkpoint_sha256 not in (None, checkpoint.sha256):
            raise GenerationError(
                f"{path} was made by {settings.checkpoint}, not by {checkpoint.path}: a watermark is found by "
                f"inverting the model that made the image, so give --checkpoint {settings.checkpoint}"
            )
    null = watermark.null_noise(checkpoint, args.null, steps=args.steps) if args.null else None
    for path, settings in made_by.items():
        images = pictures.load_images(path, size, channels, None if settings is None else settings.num_images)
        found = watermark.detect(loaded, images, key, steps=args.steps, null=null)
        null_mean = found.statistic.dof + found.statistic.noncentrality  # the mean of the null's chi-squared law
        for i, (p, chi_squared, eta) in enumerate(zip(found.p_value, found.chi_squared_p_value, found.statistic.eta)):
            name = path if len(images) == 1 else f"{path}[{i}]"
            verdict = "marked" if p < args.alpha else "not found"
            if args.json:
                print(json.dumps({"image": str(path), "index": i, "p_value": float(p), "distance": float(eta),
                                  "chi_squared_p_value": float(chi_squared), "marked": bool(p < args.alpha)}))
            else:
                print(f"{name}: distance {eta:.1f} (unmarked noise: about {null_mean:.0f}), p = {p:.3g} "
                      f"(chi-squared: {chi_squared:.3g}): {verdict}")
    return 0


def main(argv=None) -> int:
    """The exit status: 0 when done, 2 for bad input (one line on stderr; see ``cli.run_main``)."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
