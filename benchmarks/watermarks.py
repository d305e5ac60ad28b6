"""The watermark table: a Tree-Ring key in the starting noise, attacked, beside a watermark in the pixels.

    .venv/bin/python benchmarks/watermarks.py [--checkpoint runs/default] [--n 1000] [--detect-steps 10]

n digits are generated with the checkpoint's default settings, each from a noise of its own (seed i, class
i mod 10: ``diffusion.watermark.generations``), twice: from noise marked with the default key (``--key``: the
random pattern in the band 8 <= |k| <= 12) and from the same noise unmarked; n more unmarked ones, from seeds 2^31
up, are the empirical null of the p-values. Recorded:

- the quality cost: accuracy, classifier FID and recall of the marked digits beside the unmarked ones (and of
  the baseline's marked pixels), and of the null's unmarked digits, which says how far two unmarked sets of
  other seeds differ (the metric's noise);
- for every attack of ``diffusion.attacks`` (and re-generation by img2img, unconditional DDIM at strength 0.3),
  applied to the 8-bit PNG pixels: ROC AUC and the true-positive rate at a 1 % false-positive rate (the
  threshold at the unmarked digits' 99th percentile), for the Tree-Ring detector (DDIM inversion at
  ``--detect-steps`` with the null label, its distance to the key as the score: ``diffusion.watermark.detect``)
  and for the baseline, a spread-spectrum +-delta pattern added to the finished pixels (``--delta``); and the
  share of unmarked digits whose p-value is below 0.01, empirical and chi-squared (1 % if calibrated);
- also a wrong key, inversion at the paper's 50 steps (or at 10 when --detect-steps is 50), marked digits
  generated with DPM++ 2M at 20 steps but detected by DDIM inversion, four other seeds of the default key,
  and other keys (quality and detection): the rings and zeros patterns in the same band, and the paper's own
  choice, rings in the disc |k| <= a fifth of the side.

Writes ``<out>/watermarks.md`` and the raw rows as ``<out>/watermarks.jsonl``.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from diffusion import attacks, editing, generate, metrics, pictures, runs, watermark

ATTACKS = {  # name: function of (images, seed)
    "noise sigma 0.05": lambda x, s: attacks.gaussian_noise(x, 0.05, s),
    "noise sigma 0.1": lambda x, s: attacks.gaussian_noise(x, 0.1, s),
    "noise sigma 0.2": lambda x, s: attacks.gaussian_noise(x, 0.2, s),
    "blur sigma 0.5 px": lambda x, s: attacks.gaussian_blur(x, 0.5),
    "blur sigma 1 px": lambda x, s: attacks.gaussian_blur(x, 1.0),
    "JPEG quality 90": lambda x, s: attacks.jpeg(x, 90),
    "JPEG quality 50": lambda x, s: attacks.jpeg(x, 50),
    "JPEG quality 25": lambda x, s: attacks.jpeg(x, 25),
    "crop 80 % and resize": lambda x, s: attacks.crop_and_resize(x, 0.8, s),
    "rotate 5°": lambda x, s: attacks.rotate(x, 5.0),
    "rotate 15°": lambda x, s: attacks.rotate(x, 15.0),
    "brightness +0.1, contrast 0.8": lambda x, s: attacks.brightness_contrast(x, 0.1, 0.8),
}
REGENERATION_STRENGTH = 0.3


class Recovered(NamedTuple):
    """Noise recovered from images by DDIM inversion, kept to test another key on it without inverting again."""

    noise: np.ndarray


def regenerate(loaded: runs.Loaded, images, seed: int) -> np.ndarray:
    """The img2img attack: noise the images to strength 0.3 and denoise them again, unconditionally (DDIM)."""
    config = loaded.config
    null = np.full(len(images), config.num_classes, np.int32)
    fresh = np.asarray(jax.random.normal(jax.random.key(seed), images.shape))
    settings = dict(schedule=config.noise_schedule, steps=25, parameterization=config.parameterization)
    out = [
        np.asarray(editing.img2img(loaded.denoiser, images[i : i + 100], fresh[i : i + 100], cond=null[i : i + 100],
                                   strength=REGENERATION_STRENGTH, sampler="ddim", **settings).x)
        for i in range(0, len(images), 100)
    ]
    return np.clip(np.concatenate(out), -1.0, 1.0)


def detection_row(name, method, score_marked, score_unmarked, p_unmarked=None, chi_squared_unmarked=None) -> dict:
    """ROC AUC and TPR at 1 % FPR from the scores (larger: marked), and the share of unmarked digits under
    p = 0.01 by the empirical and the chi-squared p-values (1 % if calibrated)."""
    auc, tpr = watermark.roc(score_marked, score_unmarked)
    row = {"attack": name, "method": method, "auc": auc, "tpr_at_1pct_fpr": tpr, "n": len(score_marked)}
    for label, p in (("fpr_at_p_0.01", p_unmarked), ("chi_squared_fpr_at_p_0.01", chi_squared_unmarked)):
        if p is not None:
            row[label] = float(np.mean(np.asarray(p) < 0.01))
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=runs.DEFAULT_RUN)
    parser.add_argument("--n", type=int, default=1000, help="marked digits, as many unmarked, and as many for the null")
    parser.add_argument("--key", type=int, default=1234, help="the key's secret seed")
    parser.add_argument("--detect-steps", type=int, default=watermark.DEFAULT_DETECTION_STEPS)
    parser.add_argument("--delta", type=float, default=0.1, help="the baseline's pattern amplitude (model range)")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checkpoint = runs.open_checkpoint(args.checkpoint)
    loaded = runs.load(checkpoint)
    key = watermark.Key(args.key)
    settings = generate.default_settings(checkpoint)
    rows = []

    def generated(key=None, **choices):
        return watermark.generations(checkpoint, args.n, key=key, **choices)

    null_images, null_labels = watermark.generations(checkpoint, args.n, watermark.NULL_FIRST_SEED)
    nulls = {args.detect_steps: watermark.recover_noise(loaded, null_images, steps=args.detect_steps)}

    def tree_ring_row(name, marked, unmarked, key=key, steps=args.detect_steps):
        """``marked`` and ``unmarked``: images, or their noise recovered at ``steps`` already (``Recovered``)."""
        if steps not in nulls:
            nulls[steps] = watermark.null_noise(checkpoint, args.n, steps=steps)
        noise = [x if isinstance(x, Recovered) else Recovered(watermark.recover_noise(loaded, x, steps=steps))
                 for x in (marked, unmarked)]
        found = [watermark.find_key(x.noise, key, nulls[steps]) for x in noise]
        rows.append(detection_row(name, "tree-ring", -found[0].statistic.eta, -found[1].statistic.eta,
                                  found[1].p_value, found[1].chi_squared_p_value))
        return noise

    def quality_row(name, images, labels_of_images=None):
        labels_of_images = labels if labels_of_images is None else labels_of_images
        rows.append({"quality": name, **metrics.evaluate_digits(images, labels_of_images, reference="test")})
        print(json.dumps(rows[-1]), flush=True)

    unmarked, labels = generated()
    marked, _ = generated(key)
    quality_row("unmarked", unmarked)
    quality_row("marked", marked)
    quality_row("unmarked, other seeds (the null's)", null_images, null_labels)  # how far two unmarked sets differ
    baseline_seed = args.key + 1
    marked_pixels = pictures.as_saved(watermark.spread_spectrum_mark(unmarked, baseline_seed, args.delta))
    psnr = 10 * np.log10(4.0 / np.mean((marked_pixels - unmarked) ** 2))
    rows.append({"baseline_psnr_db": float(psnr), "delta": args.delta})
    quality_row("baseline-marked", marked_pixels)

    def baseline_row(name, marked, unmarked):
        p = [watermark.spread_spectrum_p_values(x, baseline_seed) for x in (marked, unmarked)]
        rows.append(detection_row(name, "pixel baseline", watermark.score(p[0]), watermark.score(p[1]), p[1]))

    clean_marked, clean_unmarked = tree_ring_row("none", marked, unmarked)
    baseline_row("none", marked_pixels, unmarked)
    attacked = dict(ATTACKS)
    attacked[f"img2img regeneration, strength {REGENERATION_STRENGTH}"] = lambda x, s: regenerate(loaded, x, s)
    for i, (name, attack) in enumerate(attacked.items()):
        attacked_unmarked = pictures.as_saved(attack(unmarked, i))
        tree_ring_row(name, pictures.as_saved(attack(marked, i)), attacked_unmarked)
        baseline_row(name, pictures.as_saved(attack(marked_pixels, i)), attacked_unmarked)

    tree_ring_row("none, wrong key", clean_marked, clean_unmarked, key=watermark.Key(args.key + 2))
    other_steps = 50 if args.detect_steps != 50 else 10  # the paper's 50, or the default's 10
    tree_ring_row(f"none, inversion at {other_steps} steps", marked, unmarked, steps=other_steps)
    dpm = dict(sampler="dpmpp_2m", steps=20)
    tree_ring_row("none, generated by DPM++ 2M at 20 steps", generated(key, **dpm)[0], generated(**dpm)[0])
    for extra in range(1, 5):  # other secret seeds: how much detection depends on the key drawn
        other = dataclasses.replace(key, seed=args.key + 10 * extra)
        tree_ring_row(f"none, another key (seed {other.seed})", generated(other)[0], clean_unmarked, key=other)
    disc = dict(pattern="rings", radius=checkpoint.config.image_size // 5, inner_radius=0)
    others = {"rings pattern, same band": dict(pattern="rings"), "zeros pattern, same band": dict(pattern="zeros"),
              f"the paper's disc: rings, radius {disc['radius']}": disc}  # no | in a table's cell
    for name, fields in others.items():
        other = dataclasses.replace(key, **fields)
        images = generated(other)[0]
        quality_row(f"marked, {name}", images)
        tree_ring_row(f"none, {name}", images, clean_unmarked, key=other)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "watermarks.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}"
    (out / "watermarks.md").write_text(report(rows, args, settings, machine, time.perf_counter() - started))
    print(f"wrote {out / 'watermarks.md'} and {out / 'watermarks.jsonl'}")


def report(rows, args, settings, machine, seconds) -> str:
    """The tables of docs/watermarks.md's measured section."""
    quality = {row["quality"]: row for row in rows if "quality" in row}
    psnr = next(row for row in rows if "baseline_psnr_db" in row)
    lines = [
        "# Tree-Ring watermarks: what a key costs, and which attacks it survives",
        "",
        "Written by benchmarks/watermarks.py; the method and its conventions are in diffusion/watermark.py's "
        "docstring, the reading of these tables in BENCHMARKS.md and notebook 12.",
        "",
        f"Measured by `benchmarks/watermarks.py --n {args.n} --detect-steps {args.detect_steps}` on {machine} "
        f"({seconds / 60:.0f} min). Generation: {settings.sampler} {settings.steps} steps, guidance "
        f"{settings.guidance:g}; key: random, band 8 <= |k| <= 12, seed {args.key}; baseline delta {args.delta:g} "
        f"(PSNR {psnr['baseline_psnr_db']:.1f} dB against the unmarked digits).",
        "",
        "| digits | accuracy | classifier FID | recall |",
        "|---|---|---|---|",
    ]
    for name, row in quality.items():
        lines.append(f"| {name} | {100 * row['accuracy']:.1f} % | {row['fid']:.1f} | {row['recall']:.2f} |")
    lines += [
        "",
        "| attack | Tree-Ring AUC | Tree-Ring TPR at 1 % FPR | unmarked under p = 0.01: empirical, chi-squared "
        "| baseline AUC | baseline TPR at 1 % FPR |",
        "|---|---|---|---|---|---|",
    ]
    detections = [row for row in rows if "attack" in row]
    for name in dict.fromkeys(row["attack"] for row in detections):
        tree = next(r for r in detections if r["attack"] == name and r["method"] == "tree-ring")
        base = next((r for r in detections if r["attack"] == name and r["method"] == "pixel baseline"), None)
        calibration = f"{100 * tree['fpr_at_p_0.01']:.1f} %, {100 * tree['chi_squared_fpr_at_p_0.01']:.1f} %"
        cells = f"| {tree['auc']:.3f} | {100 * tree['tpr_at_1pct_fpr']:.1f} % | {calibration} |"
        cells += f" {base['auc']:.3f} | {100 * base['tpr_at_1pct_fpr']:.1f} % |" if base else " | |"
        lines.append(f"| {name} {cells}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
