"""What the command-line tools share: their flags, how a flag's text is read, and how errors are reported.

``train.py``, ``sample.py`` and ``evaluate.py`` (and the benchmarks) stand side by
side on the library and never import each other; what they have in common is
here. ``config_from_flags`` reads ``train.py``'s command line (every field of
``diffusion.configs.Config`` is a flag); ``sampling_flags`` is the parser with
the flags that choose a model and how it samples, which ``sample.py`` and
``evaluate.py`` extend; ``run_main`` turns any bad input into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from diffusion import configs, runs, samplers, watermark
from diffusion.errors import InputError, UsageError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing the usage and exiting, so ``run_main`` reports
    it like any other bad input."""

    def error(self, message):
        raise UsageError(message)


def run_main(main, argv=None, *, interrupted: str = "interrupted: nothing was written") -> int:
    """``main(argv)``'s exit status; bad input (an InputError, or a file that cannot be read or written) becomes
    one line on stderr and status 2, a diverged training run status 1, Ctrl-C status 130."""
    try:
        return main(argv)
    except (InputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training stopped: the loss or the weights are no longer finite
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


# --- train.py ----------------------------------------------------------------------------------


def _flag_type(field):
    """How to read a field's value from the command line: ints, floats, strings, and comma-separated tuples."""
    default = field.default
    if isinstance(default, tuple):
        kind = str if default and isinstance(default[0], str) else int
        return lambda text: tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    return type(default)


def config_from_flags(argv=None, description: str | None = None) -> configs.RunConfig:
    """The config a ``train.py`` command line asks for: ``--preset`` and then every field of the preset's config
    class as a flag (``--learning-rate 1e-3``, ``--channel-mult 1,2,2``; ``runs.start_config``); with
    ``--resume`` the run's saved config instead of the preset (``runs.resume_config``)."""
    parser = Parser(description=description)
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=configs.PRESETS,
        help="starting point (default: cpu); flags override its fields (each kind of preset has its own: "
        "text, autoencoder, latent, latent-text)",
    )
    first = Parser(add_help=False)  # which fields are flags depends on the preset's kind: read it first
    first.add_argument("--preset", default="cpu")
    preset = first.parse_known_args(argv)[0].preset
    cls = configs.config_class(preset)
    for field in dataclasses.fields(cls):
        if field.name in cls.NOT_FLAGS:  # e.g. the tokenizer's words, which the captions' grammar decides
            continue
        flag, shown = "--" + field.name.replace("_", "-"), field.default
        shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
        kind = (
            dict(action=argparse.BooleanOptionalAction)
            if isinstance(field.default, bool)
            else dict(type=_flag_type(field))
        )
        parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{preset} preset: {shown}", **kind)
    overrides = vars(parser.parse_args(argv))
    preset = overrides.pop("preset")
    if overrides.get("resume"):
        return runs.resume_config(**overrides)
    return runs.start_config(preset, **overrides)


# --- sample.py and evaluate.py --------------------------------------------------------------


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


def label(text: str) -> int | str | None:
    """'3' -> 3; 'none' -> None, the null label (no class); any other word is a class's name ('cat'), which
    ``label_number`` turns into its number once the model is known."""
    text = text.strip()
    if text.lower() == "none":
        return None
    if not text:
        raise argparse.ArgumentTypeError("a label is a class number, a class name or none (got nothing)")
    return int(text) if text.lstrip("-").isdigit() else text


def label_list(text: str) -> tuple[int | str | None, ...]:
    """'3' -> (3,); '0,1,2' -> (0, 1, 2); 'cat,dog' -> ('cat', 'dog'); 'none' -> (None,)."""
    return tuple(label(part) for part in text.split(","))


def label_number(value: int | str | None, config) -> int | None:
    """A label of the command line as the class number of ``config``'s model: a name is looked up in its
    classes' names (``Config.label_names``: a folder's class folders, CIFAR-10's or Fashion-MNIST's classes)."""
    if not isinstance(value, str):
        return value
    names = config.label_names
    if value in names:
        return names.index(value)
    if not names:
        raise UsageError(f"this model's classes have no names: give --label as a number (got {value!r})")
    raise UsageError(f"no class named {value!r}; this model's classes: {', '.join(names)} (or their numbers)")


def sigma_interval(text: str) -> tuple[float, ...]:
    """'0.3,5' -> (0.3, 5.0), noise levels sigma low and high; 'none' -> (), guidance at every step."""
    if text.strip().lower() == "none":
        return ()
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a guidance interval is two sigmas LOW,HIGH or none (got {text!r})") from None
    return low, high


def sampling_flags(description: str) -> Parser:
    """A parser with the flags that choose the model and how it samples (``sample.py`` and ``evaluate.py``).

    Flags left out are None: the checkpoint's defaults apply (``generate.default_settings``).
    """
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag(
        "--checkpoint",
        help=f"a run folder (its last checkpoint) or a checkpoint folder (default: {runs.DEFAULT_RUN})",
    )
    flag("--sampler", choices=samplers.SAMPLERS, help="default: ddim, or flow_euler for a flow-matching model")
    flag("--steps", type=int, help="sampler steps (default: 25)")
    flag("--spacing", choices=("linspace", "leading", "trailing", "karras"), help="timesteps (default: the sampler's)")
    flag("--shift", type=float, help="a flow model: shift its times t towards the noise, t' = s t / (1 + (s - 1) t) "
         "(Esser et al. 2024, eq. 23; default: 1, none)")
    flag("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: 1.75; 1 if unconditional)")
    flag(
        "--guidance-interval",
        type=sigma_interval,
        metavar="LOW,HIGH",
        help="guide only at noise levels sigma in [LOW, HIGH] (Kynkäänniemi et al. 2024; default: 0.28,5.42); "
        "none: at every step",
    )
    flag("--batch-size", type=int, help="images per compiled batch (default: 64)")
    return parser


def watermark_flags(parser: Parser) -> None:
    """The flags that make a Tree-Ring key (``diffusion.watermark.Key``): sample.py marks with it, detect.py
    looks for it; both must be given the same."""
    flag = parser.add_argument
    flag("--watermark-key", type=int, metavar="SEED", help="the secret seed of a Tree-Ring watermark key")
    flag("--watermark-pattern", choices=watermark.PATTERNS, help="the key's pattern (default: random)")
    flag("--watermark-radius", type=float, help="the outer radius of the key's band of frequencies (default: 3/7 "
         "of the side, 12 for 28×28)")
    flag("--watermark-inner-radius", type=float, help="its inner radius (default: 2/7 of the side, 8 for 28×28; "
         "0: the paper's disc)")
    flag("--watermark-channel", type=int, help="the channel of the noise the key is in (default: 0)")


def watermark_key(args: argparse.Namespace) -> watermark.Key | None:
    """The key that ``watermark_flags`` describe, or None if no --watermark-key was given (then the other
    watermark flags are an error)."""
    given = {name: getattr(args, f"watermark_{name}") for name in ("pattern", "radius", "inner_radius", "channel")}
    given = {name: value for name, value in given.items() if value is not None}
    if args.watermark_key is None:
        if given:
            flag = "--watermark-" + next(iter(given)).replace("_", "-")
            raise UsageError(f"{flag} describes a key: give its --watermark-key too")
        return None
    return watermark.Key(args.watermark_key, **given)
