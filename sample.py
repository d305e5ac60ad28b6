"""Sample images from a trained checkpoint: ``python sample.py [--checkpoint runs/default] [options]``.

Writes a PNG grid (one row per seed, one column per label, or per prompt for a text model) into outputs/;
every PNG carries its settings, and ``--from-png`` makes the same files again,
bit for bit. Examples:

    python sample.py                                  # 4 seeds x every class, DDIM 25 steps, guidance 1.75
    python sample.py --seed 0-15 --label 7 --sampler dpmpp_2m_karras --steps 15
    python sample.py --label 3 --negative-label 8 --guidance 4
    python sample.py --checkpoint runs/text --prompt "a bold seven" --negative-prompt "leaning right"
    python sample.py --interpolate 1 2 --n 10 --label 5   # noise moving from seed 1 to seed 2 (slerp)
    python sample.py --init-image digit.png --strength 0.6 --label 8    # img2img (SDEdit)
    python sample.py --init-image digit.png --mask mask.png             # inpaint where the mask is white
    python sample.py --trajectory --n 1               # + a strip of x_t and predicted x0, and a GIF
    python sample.py --from-png outputs/some-grid.png --out again/
    python sample.py --watermark-key 1234 --seed 0-9 --label 3    # Tree-Ring watermark (detect.py finds it)
    python sample.py --lora runs/lora-A --label 10     # a new class taught by a LoRA adapter (train.py --preset lora)
    python sample.py --lora runs/lora-A --lora-scale 1 --lora runs/lora-hollow --lora-scale 0.5   # two at once

The library behind it is diffusion/generate.py; the flags it shares with evaluate.py are in diffusion/cli.py.
"""

import argparse
import hashlib
import sys
from pathlib import Path

from diffusion import cli, generate, runs
from diffusion.errors import UsageError

DEFAULT_NOISES = 4  # rows of a grid
DEFAULT_INTERPOLATION = 8  # images along an interpolation


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.sampling_flags(__doc__)
    flag = parser.add_argument
    flag("--seed", type=cli.seed_list, help="the seeds of the rows: 7, 0-15 or 1,5,9 (default: 0, counting up --n)")
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
    flag("--label", type=cli.label_list,
         help="the class of each column: 3, 0,1,2, a name (cat,dog: a folder's class folders) or none "
              "(default: every class)")
    flag("--negative-label", type=cli.label, help="a class (number or name) for guidance to push away from")
    flag(
        "--prompt",
        action="append",
        help='a text model: the prompt of a column, e.g. "a bold seven" (give it again for more columns)',
    )
    flag("--negative-prompt", help='a text model: what guidance pushes away from, e.g. "thin" (default: "")')
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
    flag("--lora", action="append", metavar="ADAPTER",
         help="a LoRA adapter (its run folder or adapter.safetensors) on the checkpoint; give it again for more")
    flag("--lora-scale", action="append", type=float, metavar="S",
         help="each adapter's scale: 0 = off, 1 = as trained (default 1); one for all, or one per --lora")
    cli.watermark_flags(parser)
    flag("--from-png", metavar="IMAGE", help="make the files of a PNG written by sample.py again, from its settings")
    flag(
        "--out", default="outputs", help="a folder (files named after the settings) or a .png path (default: outputs/)"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[generate.Settings, runs.Checkpoint | None]:
    """The Settings that the command line asks for (the flags given, over the checkpoint's defaults), and the
    checkpoint opened to make them (None with --from-png: ``generate`` opens the one the settings name)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "out" and not k.startswith("watermark")}
    if "lora" in given or "lora_scale" in given:
        given["loras"] = adapters_from_args(given.pop("lora", []), given.pop("lora_scale", None))
    if args.watermark_key is not None:
        given["watermarked"] = True
    if "from_png" in given:
        given.pop("watermarked", None)  # the PNG says whether it is marked; its key is the one flag it cannot hold
        others = [f"--{k.replace('_', '-')}" for k in given if k != "from_png"]
        if others:
            raise UsageError(f"--from-png takes every setting from the image; leave out {', '.join(others)}")
        return generate.read_settings(given["from_png"]), None
    checkpoint = runs.open_checkpoint(given.pop("checkpoint", runs.DEFAULT_RUN))
    n = given.pop("n", None)
    if n is not None and n < 1:
        raise UsageError(f"--n must be a whole number >= 1 (got {n})")
    if "label" in given:
        given["labels"] = tuple(cli.label_number(label, checkpoint.config) for label in given.pop("label"))
    if "negative_label" in given:
        given["negative_label"] = cli.label_number(given["negative_label"], checkpoint.config)
    if "prompt" in given:
        given["prompts"] = tuple(given.pop("prompt"))
    if "interpolate" in given:
        if "seed" in given:
            raise UsageError("--interpolate names its two seeds; leave out --seed")
        given.update(seeds=tuple(given.pop("interpolate")), interpolate=n or DEFAULT_INTERPOLATION)
    else:
        seeds = given.pop("seed", (0,))
        if n is not None and len(seeds) > 1:
            raise UsageError("--n counts seeds up from a single --seed; with a range or a list of seeds leave it out")
        given["seeds"] = tuple(range(seeds[0], seeds[0] + (n or DEFAULT_NOISES))) if len(seeds) == 1 else seeds
    return generate.default_settings(checkpoint, **given), checkpoint


def adapters_from_args(paths: list[str], scales: list[float] | None) -> tuple:
    """(adapter file, scale, sha256) for each --lora, with its --lora-scale (one for all, or one each)."""
    if not paths:
        raise UsageError("--lora-scale sets the scale of an adapter: give the adapter with --lora")
    scales = scales or [1.0]
    if len(scales) == 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise UsageError(f"give one --lora-scale for all the adapters, or one per --lora ({len(paths)})")
    return tuple((str(a.path), scale, a.sha256) for a, scale in zip(map(runs.open_adapter, paths), scales))


def default_name(settings: generate.Settings, checkpoint: runs.Checkpoint) -> str:
    """A file name that says what the grid is, ending in a hash of the settings so that different runs never collide."""
    model = checkpoint.run_name if checkpoint.step is None else f"{checkpoint.run_name}-{checkpoint.step}"
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
    return f"{model}-{settings.sampler}-{settings.steps}-{mode}{'-'.join(map(str, seeds))}-{digest}.png"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run(argv=None) -> int:
    args = parse_args(argv)
    settings, checkpoint = settings_from_args(args)
    checkpoint = checkpoint or runs.open_checkpoint(settings.checkpoint)
    key = cli.watermark_key(args)
    generation = generate.generate(settings, checkpoint=checkpoint, progress=True, watermark_key=key)
    out = Path(args.out)
    paths = generate.save(
        generation, settings, out if out.suffix.lower() == ".png" else out / default_name(settings, checkpoint)
    )
    print(
        f"{_count(settings.num_images, 'image')}, {settings.sampler} {_count(settings.steps, 'step')}, "
        f"{_count(generation.nfe, 'network call')} each"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """The exit status: 0 when done, 2 for bad input (one line on stderr; see ``cli.run_main``)."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
