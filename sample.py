"""Sample images from a trained checkpoint: ``python sample.py [--checkpoint runs/default] [options]``.

Writes a PNG grid (one row per seed, one column per label) into outputs/;
every PNG carries its settings, and ``--from-png`` makes the same files again,
bit for bit. Examples:

    python sample.py                                  # 4 seeds x every class, DDIM 25 steps, guidance 3
    python sample.py --seed 0-15 --label 7 --sampler dpmpp_2m_karras --steps 15
    python sample.py --label 3 --negative-label 8 --guidance 4
    python sample.py --interpolate 1 2 --n 10 --label 5   # noise moving from seed 1 to seed 2 (slerp)
    python sample.py --init-image digit.png --strength 0.6 --label 8    # img2img (SDEdit)
    python sample.py --init-image digit.png --mask mask.png             # inpaint where the mask is white
    python sample.py --trajectory --n 1               # + a strip of x_t and predicted x0, and a GIF
    python sample.py --from-png outputs/some-grid.png --out again/

The library behind it is diffusion/generate.py.
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path

from diffusion import generate, samplers

DEFAULT_CHECKPOINT = "runs/default"
DEFAULT_NOISES = 4  # rows of a grid
DEFAULT_INTERPOLATION = 8  # images along an interpolation


def seed_list(text: str) -> tuple[int, ...]:
    """'7' -> (7,); '0-3' -> (0, 1, 2, 3); '1,5,9' -> (1, 5, 9); lists may hold ranges."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"seeds are whole numbers >= 0, ranges like 0-15 or lists (got {text!r})")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise argparse.ArgumentTypeError(f"the range {part.strip()} runs backwards; write {last}-{first}")
        seeds.extend(range(first, last + 1))
    return tuple(seeds)


def label(text: str) -> int | None:
    """'3' -> 3; 'none' -> None, the null label (no class)."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a label is a class number or none (got {text!r})") from None


def label_list(text: str) -> tuple[int | None, ...]:
    """'3' -> (3,); '0,1,2' -> (0, 1, 2); 'none' -> (None,)."""
    return tuple(label(part) for part in text.split(","))


class UsageError(ValueError):
    """A command line that argparse cannot read."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing the usage and exiting, so main reports it."""

    def error(self, message):
        raise UsageError(message)


def sampling_flags(description: str) -> Parser:
    """A parser with the flags that choose the model and how it samples (shared with evaluate.py).

    Flags left out are None: the checkpoint's defaults apply (``generate.default_settings``).
    """
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag(
        "--checkpoint",
        help=f"a run folder (its last checkpoint) or a checkpoint folder (default: {DEFAULT_CHECKPOINT})",
    )
    flag("--sampler", choices=samplers.SAMPLERS, help="default: ddim, or flow_euler for a flow-matching model")
    flag("--steps", type=int, help="sampler steps (default: 25)")
    flag("--spacing", choices=("linspace", "leading", "trailing", "karras"), help="timesteps (default: the sampler's)")
    flag("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: 3; 1 if unconditional)")
    flag("--batch-size", type=int, help="images per compiled batch (default: 64)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = sampling_flags(__doc__)
    flag = parser.add_argument
    flag("--seed", type=seed_list, help="the seeds of the rows: 7, 0-15 or 1,5,9 (default: 0, counting up --n)")
    flag(
        "--n",
        type=int,
        help=f"seeds counting up from --seed (default: {DEFAULT_NOISES}); "
        f"with --interpolate, images along the way (default: {DEFAULT_INTERPOLATION})",
    )
    flag(
        "--interpolate",
        nargs=2,
        type=int,
        metavar=("SEED_A", "SEED_B"),
        help="a row whose noise moves from seed A's to seed B's by spherical interpolation",
    )
    flag("--label", type=label_list, help="the class of each column: 3, 0,1,2 or none (default: every class)")
    flag("--negative-label", type=label, help="a class for guidance to push away from")
    flag("--init-image", help="a picture to start from: img2img with --strength, inpainting with --mask")
    flag("--strength", type=float, help="img2img: 0 keeps the init image, 1 ignores it")
    flag("--mask", help="inpainting: white = generate, black = keep the init image")
    flag("--resize", action="store_true", default=None, help="resize the init image and mask to the model's size")
    flag(
        "--trajectory",
        action="store_true",
        default=None,
        help="also write a strip of x_t and predicted x0 over the steps, and a GIF of the denoising",
    )
    flag("--from-png", metavar="IMAGE", help="make the files of a PNG written by sample.py again, from its settings")
    flag(
        "--out", default="outputs", help="a folder (files named after the settings) or a .png path (default: outputs/)"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> generate.Settings:
    """The Settings that the command line asks for: the flags given, over the checkpoint's defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "out"}
    if "from_png" in given:
        others = [f"--{k.replace('_', '-')}" for k in given if k != "from_png"]
        if others:
            raise UsageError(f"--from-png takes every setting from the image; leave out {', '.join(others)}")
        return generate.read_settings(given["from_png"])
    checkpoint = generate.open_checkpoint(given.pop("checkpoint", DEFAULT_CHECKPOINT))
    n = given.pop("n", None)
    if n is not None and n < 1:
        raise UsageError(f"--n must be a whole number >= 1 (got {n})")
    if "label" in given:
        given["labels"] = given.pop("label")
    if "interpolate" in given:
        if "seed" in given:
            raise UsageError("--interpolate names its two seeds; leave out --seed")
        given.update(seeds=tuple(given.pop("interpolate")), interpolate=n or DEFAULT_INTERPOLATION)
    else:
        seeds = given.pop("seed", (0,))
        if n is not None and len(seeds) > 1:
            raise UsageError("--n counts seeds up from a single --seed; with a range or a list of seeds leave it out")
        given["seeds"] = tuple(range(seeds[0], seeds[0] + (n or DEFAULT_NOISES))) if len(seeds) == 1 else seeds
    return generate.default_settings(checkpoint, **given)


def default_name(settings: generate.Settings) -> str:
    """A file name that says what the grid is, ending in a hash of the settings so that different runs never collide."""
    checkpoint = Path(settings.checkpoint)
    run = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name
    step = checkpoint.name.removeprefix("step_").lstrip("0") or "0"
    seeds = settings.seeds if len(settings.seeds) == 1 else (settings.seeds[0], settings.seeds[-1])
    if settings.interpolate:
        mode = "slerp"
    elif settings.strength is not None:
        mode = "img2img"
    elif settings.mask is not None:
        mode = "inpaint"
    else:
        mode = "seed"
    digest = hashlib.sha256(settings.to_json().encode()).hexdigest()[:8]
    return f"{run}-{step}-{settings.sampler}-{settings.steps}-{mode}{'-'.join(map(str, seeds))}-{digest}.png"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        settings = settings_from_args(args)
        generation = generate.generate(settings, progress=True)
        out = Path(args.out)
        paths = generate.save(
            generation, settings, out if out.suffix.lower() == ".png" else out / default_name(settings)
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(
        f"{_count(settings.num_images, 'image')}, {settings.sampler} {_count(settings.steps, 'step')}, "
        f"{_count(generation.nfe, 'network call')} each"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
