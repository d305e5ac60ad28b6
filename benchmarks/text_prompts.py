"""How well does a text model follow its prompts? Digits, attributes, held-out combinations, negative prompts.

    .venv/bin/python benchmarks/text_prompts.py [--checkpoint runs/text] [--prompts 100] [--seeds 10] [--out docs]
        [--name prompts]

(``--prompts 4 --seeds 1 --negative-seeds 2`` on a tiny run checks the script in seconds.)

With the settings ``sample.py`` uses by default for a text model (DDIM, 25
steps, guidance 3 in sigma [0.28, 5.42]), ``diffusion.evaluation.evaluate_prompts`` draws each
prompt with every seed and judges the digits:

1. **Seen prompts**: ``--prompts`` prompts from ``captions.evaluation_prompts``
   (a digit and one to three attributes, never a held-out combination):
   digit accuracy (the project's classifier), classifier FID beside its floor,
   and per attribute the share of digits in the bin asked for (chance: 1/3 for
   thickness and slant, 1/3 for "small" or "large"), with the median signed
   margin into that bin; beside it the same margin for the real held-out
   digits in their own bins.
2. **Held-out combinations** (``captions.HELD_OUT``), never named together in training.
3. **Negative prompts**: the measured attribute of "a seven" with and without
   a negative prompt, its mean shift and the standard error of that shift.
4. **Guidance sweep**: scales 1, 1.75 (the label models' default), 2, 3 and 5.

Prints the tables; with ``--out DIR`` writes DIR/prompts.md and DIR/prompts.jsonl (``--name`` for another
name than prompts: ``--checkpoint runs/latent-text --name prompts_latent``).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from diffusion import captions, cli, data, evaluation, generate, runs
from diffusion.configs import TextConfig

NEGATIVE_CASES = (  # (prompt, negative prompt, attribute it should move)
    ("a seven", "bold", "thickness"),
    ("a seven", "leaning right", "slant"),
    ("a two", "small", "size"),
)
GUIDANCE_SWEEP = (1.0, 1.75, 2.0, 3.0, 5.0)


def attribute_columns(row: dict) -> str:
    return " | ".join(
        f"{row['attributes'][a]['accuracy']:.1%} ({row['attributes'][a]['margin']:+.2f})" if a in row["attributes"]
        else "-"
        for a in captions.BINS
    )


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    header = "| " + title + " | images | digit accuracy | classifier FID (floor) | " + " | ".join(
        f"{a} in bin (margin)" for a in captions.BINS
    ) + " |"
    lines = [header, "|" + "---|" * (4 + len(captions.BINS))]
    for name, row in rows:
        lines.append(
            f"| {name} | {row['n']} | {row['accuracy']:.1%} | {row['fid']:.1f} ({row['floor']:.1f}) | "
            f"{attribute_columns(row)} |"
        )
    return "\n".join(lines)


def real_margins(config, cuts) -> dict:
    """The margins of the real held-out digits in their own bins: how far inside a bin a real digit lies."""
    images, labels = data.load_dataset(config.dataset, "test")
    measured = captions.measure(images)
    bins = captions.attribute_bins(measured, labels, cuts)
    asked = [
        {a: captions.BINS[a][bins[a][i]] for a in captions.BINS if captions.BINS[a][bins[a][i]] in captions.PHRASES[a]}
        for i in range(len(images))
    ]
    return evaluation.attribute_report(images, labels, asked, cuts)


def negative_shift(checkpoint, prompt, negative, attribute, seeds) -> dict:
    """The mean measured ``attribute`` of ``prompt`` with and without ``negative``, on the same seeds."""
    values = []
    for neg in (None, negative):
        settings = generate.default_settings(
            checkpoint, prompts=(prompt,), seeds=tuple(range(seeds)), negative_prompt=neg
        )
        images = generate.generate(settings, checkpoint=checkpoint).images
        values.append(captions.MEASURES[attribute](data.from_model_range(images)))
    difference = values[1] - values[0]  # paired: the same noise with and without the negative prompt
    return {
        "prompt": prompt,
        "negative": negative,
        "attribute": attribute,
        "without": float(values[0].mean()),
        "with": float(values[1].mean()),
        "shift": float(difference.mean()),
        "stderr": float(difference.std(ddof=1) / np.sqrt(len(difference))),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/text")
    parser.add_argument("--prompts", type=int, default=100, help="seen prompts (default: 100)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per prompt (default: 10)")
    parser.add_argument("--negative-seeds", type=int, default=200, help="seeds per negative-prompt case (default: 200)")
    parser.add_argument("--out", help="write DIR/NAME.md and DIR/NAME.jsonl")
    parser.add_argument("--name", default="prompts", help="the files' name (default: prompts)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checkpoint = runs.open_checkpoint(args.checkpoint)
    if not isinstance(checkpoint.config, TextConfig):
        raise SystemExit(f"error: {args.checkpoint} holds a {checkpoint.kind} model; this judges text models")
    cuts = evaluation.attribute_cuts(checkpoint.config)
    rng = np.random.default_rng(0)
    seen_prompts = captions.evaluation_prompts(rng, args.prompts)
    held_prompts = captions.evaluation_prompts(rng, 10 * len(captions.HELD_OUT), held_out=True)

    seen = evaluation.evaluate_prompts(checkpoint, seen_prompts, args.seeds, cuts=cuts)
    held = evaluation.evaluate_prompts(checkpoint, held_prompts, args.seeds, cuts=cuts)
    real = real_margins(checkpoint.config, cuts)
    sweep = [
        (f"guidance {g:g}", evaluation.evaluate_prompts(checkpoint, seen_prompts, max(args.seeds // 2, 1), cuts=cuts,
                                                        guidance=g))
        for g in GUIDANCE_SWEEP
    ]
    negatives = [negative_shift(checkpoint, *case, args.negative_seeds) for case in NEGATIVE_CASES]

    lines = [
        "# Text prompts: digits, attributes, held-out combinations, negative prompts",
        "",
        f"Checkpoint `{checkpoint.path}`; DDIM 25 steps, guidance 3 in sigma [0.28, 5.42] unless a row says "
        f"otherwise; each prompt drawn with {args.seeds} seeds. Attribute columns: the share of digits whose "
        "measured attribute lies in the bin the prompt asked for (over the prompts that name it), and in brackets "
        "the median signed margin into that bin (pixels for thickness, pixels per pixel for slant, pixels² for "
        "size; < 0: outside).",
        "",
        f"Machine: {platform.machine()}, JAX {jax.__version__} on {jax.default_backend()}; "
        f"{(time.perf_counter() - started) / 60:.0f} minutes. Command: `python benchmarks/text_prompts.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        table("prompts", [(f"seen ({len(seen_prompts)})", seen), (f"held out ({len(held_prompts)})", held)]),
        "",
        "Real held-out digits in their own bins (the margin a perfect model would show): "
        + ", ".join(f"{a} {r['margin']:+.2f}" for a, r in real.items()),
        "",
        "### Guidance sweep (seen prompts)",
        "",
        table("guidance", sweep),
        "",
        f"### Negative prompts ({args.negative_seeds} seeds, the same noise with and without)",
        "",
        "| prompt | negative prompt | attribute | without | with | shift ± s.e. |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n['prompt']} | {n['negative']} | {n['attribute']} | {n['without']:.3f} | {n['with']:.3f} | "
            f"{n['shift']:+.3f} ± {n['stderr']:.3f} |"
            for n in negatives
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        (out / f"{args.name}.md").write_text(text)
        (out / f"{args.name}.jsonl").write_text(
            "".join(json.dumps({"name": name, **{k: v for k, v in row.items() if k != "images"}}) + "\n"
                    for name, row in [("seen", seen), ("held_out", held), *sweep])
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
