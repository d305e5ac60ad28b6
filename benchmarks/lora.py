"""The LoRA table: adapters of ranks 1, 4 and 16 beside a full fine-tune, on a new letter and on a style.

    .venv/bin/python benchmarks/lora.py [--base runs/default] [--steps 400] [--n 1000] [--concept-n 200]
    .venv/bin/python benchmarks/lora.py --adapters 4:embedding+attention --concepts letters --append

For each concept (the letter "A" as a new class, and hollow digits, ``diffusion.concepts``) and each method (LoRA
adapters ``--adapters``, each a rank r with alpha = r on the default layers or on the layer groups named after a
colon; and every weight fine-tuned), an adapter run of ``--steps``
steps is trained from the same base into ``--runs-dir`` and measured:

- its size: trainable numbers (and their share of the base's), the adapter file's bytes, the training time on
  this machine (the same steps and batches for every method);
- the new concept's quality, judged by a classifier built for it and validated on held-out data
  (``diffusion.concepts.letter_judge`` / ``style_judge``): the share of ``--concept-n`` generated "A"s judged
  "A", or the share of n generated digits judged hollow and the right digit;
- forgetting: the base digits' classifier accuracy, FID and recall (``diffusion.metrics``) at adapter scales 0,
  0.5 and 1 (scale 0 checked bit-identical to the base), and the full fine-tune's.

Every generation uses the base's default settings (DDIM 25 steps, guidance 1.75 in its interval), seeds from 0.
Writes ``<out>/lora.md`` and the raw rows as ``<out>/lora.jsonl``; ``--append`` adds the new rows to those already
in ``lora.jsonl`` (measured with the same judges, which are trained from fixed seeds) and writes the table of all.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from diffusion import concepts, configs, data, generate, lora, metrics, runs, training

SCALES = (0.0, 0.5, 1.0)
PRESET_LEARNING_RATE = configs.PRESETS["lora"]["learning_rate"]
LETTER = "A"
STYLE = "hollow"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=runs.DEFAULT_RUN)
    parser.add_argument("--runs-dir", default="runs/lora-benchmark", help="where the adapter runs go (replaced)")
    parser.add_argument("--adapters", default="1,4,16", help="ranks, each with targets if not the default: "
                        "4:embedding+attention")
    parser.add_argument("--concepts", default=f"letters,{STYLE}")
    parser.add_argument("--lora-learning-rate", type=float, help="the adapters' learning rate (default: the preset's)")
    parser.add_argument("--no-full", action="store_true", help="leave out the full fine-tune")
    parser.add_argument("--append", action="store_true", help="add to the rows of <out>/lora.jsonl")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n", type=int, default=1000, help="digits per measurement (100 per class)")
    parser.add_argument("--concept-n", type=int, default=200, help="generated letters per measurement")
    parser.add_argument("--judge-steps", type=int, default=1000, help="training steps of each judge")
    parser.add_argument("--out", default="docs")
    return parser.parse_args(argv)


def draw(base, labels, n_per_label, adapter=None, scale=1.0):
    """n_per_label images per label from the base (with ``adapter`` at ``scale``), seeds from 0, the base's
    default settings; returns (uint8 images as a PNG keeps them, labels, the sampler's float images)."""
    loras = () if adapter is None else ((str(adapter.path), scale, adapter.sha256),)
    settings = generate.default_settings(base, seeds=tuple(range(n_per_label)), labels=tuple(labels), loras=loras)
    generation = generate.generate(settings, checkpoint=base)
    return data.from_model_range(generation.images), np.asarray(generation.labels), generation.images


def digit_metrics(images, labels) -> dict:
    found = metrics.evaluate_digits(images, labels)
    return {k: found[k] for k in ("accuracy", "fid", "recall", "floor")}


def style_scores(judge, digits, labels) -> dict:
    """The shares of digits the style judge calls hollow and the digit asked for, and the digit asked for in either
    style."""
    predicted = concepts.judge_predictions(judge, digits)
    hollow, right_digit = predicted == 10 + labels, predicted % 10 == labels
    return {"hollow": float(hollow.mean()), "hollow_right_digit": float(right_digit.mean())}


def train_adapter(base, runs_dir: Path, concept: str, method: str, rank: int | None, targets, steps: int,
                  learning_rate: float | None):
    preset = "lora" if concept == "letters" else "lora-style"
    name = f"{concept}-{'full' if method == 'full' else f'r{rank}-' + '+'.join(targets)}"
    overrides = dict(rank=rank, alpha=float(rank), targets=targets) if method == "lora" else {}
    if method == "lora" and learning_rate:
        overrides["learning_rate"] = learning_rate
    config = runs.start_config(preset, runs_dir=str(runs_dir), name=name, base=str(base.path), method=method,
                               steps=steps, sample_every=0, **overrides)
    started = time.perf_counter()
    state = training.train(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, state, seconds, rows[-1]["images_per_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    base = runs.open_checkpoint(args.base)
    runs_dir = Path(args.runs_dir)
    shutil.rmtree(runs_dir, ignore_errors=True)
    adapters = []  # (rank, targets)
    for spec in args.adapters.split(","):
        rank, _, targets = spec.partition(":")
        adapters.append((int(rank), tuple(targets.split("+")) if targets else lora.AdapterConfig.targets))
    per_class = args.n // 10
    base_params = lora.count(runs.load_model(base))

    started = time.perf_counter()
    letter_judge = concepts.letter_judge(LETTER, steps=args.judge_steps)
    hollow_judge = concepts.style_judge(STYLE, steps=args.judge_steps)
    judges = {"letter": concepts.validate_letter_judge(letter_judge, LETTER),
              "hollow": concepts.validate_style_judge(hollow_judge, STYLE), "seconds": time.perf_counter() - started}
    print("judges:", judges, flush=True)

    base_digits, digit_labels, base_floats = draw(base, range(10), per_class)
    rows = [{"concept": "base", "method": "base", **digit_metrics(base_digits, digit_labels),
             **style_scores(hollow_judge, base_digits, digit_labels)}]
    print(rows[-1], flush=True)
    methods = [("lora", rank, targets) for rank, targets in adapters] + [("full", None, None)] * (not args.no_full)
    for concept in args.concepts.split(","):
        for method, rank, targets in methods:
            config, state, seconds, images_per_s = train_adapter(base, runs_dir, concept, method, rank, targets,
                                                                 args.steps, args.lora_learning_rate)
            adapter = runs.open_adapter(config.run_dir)
            trainable = sum(np.asarray(a).size for a in adapter.arrays.values())
            row = {"concept": concept, "method": method, "rank": rank, "targets": targets,
                   "learning_rate": config.learning_rate, "trainable": trainable,
                   "share": trainable / base_params, "file_bytes": adapter.path.stat().st_size,
                   "train_s": seconds, "images_per_s": images_per_s, "steps": args.steps}
            for scale in (SCALES if method == "lora" else (1.0,)):
                digits, labels, floats = draw(base, range(10), per_class, adapter, scale)
                at = {**digit_metrics(digits, labels), **style_scores(hollow_judge, digits, labels)}
                if scale == 0.0:
                    at["identical_to_base"] = bool(np.array_equal(floats, base_floats))
                if concept == "letters":
                    letters, _, _ = draw(base, (10,), args.concept_n, adapter, scale)
                    at["letter"] = concepts.concept_accuracy(letter_judge, letters, 10)
                row[f"scale {scale:g}"] = at
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    header = {"machine": machine, "judges": judges, "args": vars(args)}
    if args.append:  # the earlier rows under their header, beside this run's (its base row is the same digits)
        header, _, *earlier = [json.loads(line) for line in (out / "lora.jsonl").read_text().splitlines()]
        rows = [rows[0], *earlier, *rows[1:]]
    with open(out / "lora.jsonl", "w") as f:
        for row in [header, *rows]:
            f.write(json.dumps(row) + "\n")
    judges, args = header["judges"], argparse.Namespace(**header["args"])
    (out / "lora.md").write_text(report(rows, judges, args, machine))
    print(f"wrote {out / 'lora.md'}")
    return 0


def _pct(x) -> str:
    return f"{100 * x:.1f} %"


def report(rows, judges, args, machine) -> str:
    base = rows[0]
    lines = [
        "# LoRA: what an adapter costs and what it keeps",
        "",
        f"Written by `benchmarks/lora.py` ({args.steps} steps, batch 32, {args.n} digits and {args.concept_n} "
        f"letters per measurement) on {machine}. Base: `{args.base}`, whose digits score accuracy "
        f"{_pct(base['accuracy'])}, classifier FID {base['fid']:.1f} (real-data floor {base['floor']:.1f}), "
        f"recall {base['recall']:.2f}.",
        "",
        f"Judges: the letter judge scores {_pct(judges['letter']['letters'])} on held-out rendered letters and "
        f"{_pct(judges['letter']['digits'])} on the test digits; the hollow judge "
        f"{_pct(judges['hollow']['styled'])} on hollow test digits (style and digit right) and "
        f"{_pct(judges['hollow']['plain'])} on plain ones.",
        "",
    ]
    # Forgetting: for a new class, the digits' accuracy (the digit classifier); for a style, which redraws every
    # digit on purpose, whether the digit is still the one asked for (the style judge, in either style).
    for concept, quality, name, kept, kept_name in (
        ("letters", "letter", f'"{LETTER}" judged "{LETTER}"', "accuracy", "digit accuracy"),
        (STYLE, "hollow", "digits judged hollow and the right digit", "hollow_right_digit", "right digit, any style"),
    ):
        lines += [
            f"## {'The letter ' + LETTER + ' as a new class' if concept == 'letters' else 'Hollow digits, a style'}",
            "",
            f"| method | trainable | share of base | file | training | {name} (scale 1) | {kept_name} "
            "0 / 0.5 / 1 | FID 0 / 0.5 / 1 | recall 1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows[1:]:
            if row["concept"] != concept:
                continue
            scales = [row.get(f"scale {s:g}") for s in SCALES]
            accuracy = " / ".join("–" if s is None else _pct(s[kept]) for s in scales)
            fid = " / ".join("–" if s is None else f"{s['fid']:.1f}" for s in scales)
            one = row["scale 1"]
            targets = row.get("targets") or lora.AdapterConfig.targets
            method = f"LoRA r = {row['rank']}" if row["method"] == "lora" else "full fine-tune"
            if row["method"] == "lora" and tuple(targets) != lora.AdapterConfig.targets:
                method += f" ({', '.join(targets)} only)"
            if row.get("learning_rate", PRESET_LEARNING_RATE) != PRESET_LEARNING_RATE:
                method += f", learning rate {row['learning_rate']:g}"
            lines.append(
                f"| {method} | "
                f"{row['trainable']:,} | {_pct(row['share'])} | {row['file_bytes'] / 1024:.0f} KiB | "
                f"{row['train_s']:.0f} s | {_pct(one[quality])} | {accuracy} | {fid} | {one['recall']:.2f} |"
            )
        lines.append("")
        full = next((r for r in rows if r["concept"] == concept and r["method"] == "full"), None)
        for row in rows:
            if row["concept"] != concept or row["method"] != "lora" or full is None:
                continue
            one, reference = row["scale 1"], full["scale 1"][quality]
            lines.append(
                f"- r = {row['rank']} ({', '.join(row.get('targets') or lora.AdapterConfig.targets)}; learning rate "
                f"{row.get('learning_rate', PRESET_LEARNING_RATE):g}): "
                f"{_pct(row['share'])} of the base's numbers; quality {one[quality] / max(reference, 1e-9):.2f} × the "
                f"full fine-tune's; {kept_name} {100 * (one[kept] - base[kept]):+.1f} points at scale 1 "
                f"(the full fine-tune: {100 * (full['scale 1'][kept] - base[kept]):+.1f}); scale 0 "
                f"{'bit-identical to' if row['scale 0'].get('identical_to_base') else 'DIFFERENT from'} the base"
            )
        lines.append("")
    lines += [
        "The goal: with at most 2 % of the base's numbers, the new concept's quality within 10 % of the full "
        "fine-tune's (a ratio of at least 0.90) and the digits' accuracy down by at most 2 points at scale 1.",
        "",
        "Quality is the judge's verdict on generated images: for the letter, the share of label-10 images the letter "
        "judge calls \"A\"; for the style, the share of digits the hollow judge calls hollow *and* the digit asked "
        "for. Digit accuracy and FID are the metrics of `diffusion.metrics` on 100 digits of each class, against the "
        "1,000 test digits; for the style, whose digits are meant to look unlike the test digits, FID and recall "
        "measure the change of style more than any loss. Training times include compiling (about 10 s).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
