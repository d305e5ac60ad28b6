"""The steps-vs-quality table: every sampler at several step counts, and a guidance sweep.

    .venv/bin/python benchmarks/steps_vs_quality.py [--checkpoint runs/default] [--n 1000] [--out docs]

For each (sampler, steps) it generates n digits (n/10 per class, the same seeds
for every row) with ``diffusion.evaluation`` (what ``evaluate.py`` runs) and records NFE, seconds per 100
digits, classifier accuracy, MNIST-classifier FID (with its real-vs-real floor),
precision and recall. Writes ``<out>/quality.md`` (the tables, the machine and
the command) and ``<out>/quality.png`` (FID against NFE per sampler), and the
raw rows as ``<out>/quality.jsonl``. Flow samplers are skipped for models that
are not flow models, and vice versa.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion import evaluation, runs, samplers  # noqa: E402

STEPS = (5, 10, 20, 50, 100)
GUIDANCE_SWEEP = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)


def run(checkpoint: runs.Checkpoint, sampler, steps, guidance, n, reference="test"):
    settings = evaluation.digit_settings(checkpoint, n, sampler=sampler, steps=steps, guidance=guidance)
    row = evaluation.evaluate(settings, reference, checkpoint)
    print(json.dumps({k: row[k] for k in ("sampler", "steps", "guidance", "nfe", "accuracy", "fid", "sampling_s")}), flush=True)
    return row


def markdown(rows, title, first="sampler", name=lambda r: r["sampler"]):
    lines = [
        f"### {title}",
        "",
        f"| {first} | steps | NFE | s / 100 digits | accuracy | classifier FID | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {name(r)} | {r['steps']} | {r['nfe']} | {100 * r['sampling_s'] / r['n']:.1f} | {r['accuracy']:.1%} "
            f"| {r['fid']:.1f} | {r['precision']:.2f} | {r['recall']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/default")
    parser.add_argument("--n", type=int, default=1000, help="digits per row, a multiple of 10")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the steps table")
    parser.add_argument("--sweep-sampler", default="dpmpp_2m", help="sampler of the guidance sweep")
    parser.add_argument("--sweep-steps", type=int, default=20)
    parser.add_argument("--ddpm-1000", action=argparse.BooleanOptionalAction, default=True, help="add DDPM at 1000 steps")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)

    checkpoint = runs.open_checkpoint(args.checkpoint)
    flow = checkpoint.config.parameterization == "velocity"
    names = [name for name, s in samplers.SAMPLERS.items() if (s.family == "flow") == flow]
    started = time.perf_counter()
    steps_rows = [run(checkpoint, name, steps, args.guidance, args.n) for name in names for steps in STEPS]
    if args.ddpm_1000 and not flow:
        steps_rows.append(run(checkpoint, "ddpm", 1000, args.guidance, args.n))
    sweep_rows = [run(checkpoint, args.sweep_sampler, args.sweep_steps, g, args.n) for g in GUIDANCE_SWEEP]
    minutes = (time.perf_counter() - started) / 60

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in steps_rows + sweep_rows)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        rows = [r for r in steps_rows if r["sampler"] == name]
        ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], "o-", label=name)
    floor = steps_rows[0]["floor"]
    ax.axhline(floor, color="k", ls=":", label=f"real-vs-real floor ({floor:.1f})")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per digit (NFE)", ylabel="MNIST-classifier FID",
           title=f"FID against NFE, guidance {args.guidance:g}, {args.n} digits per point")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)

    sweep_table = markdown(sweep_rows, f"Guidance sweep: {args.sweep_sampler}, {args.sweep_steps} steps",
                           first="guidance scale", name=lambda r: f"{r['guidance']:g}")
    text = "\n\n".join([
        "# Steps against quality",
        f"Checkpoint `{args.checkpoint}`; {args.n} digits per row ({args.n // 10} per class, seeds 0..{args.n // 10 - 1}); "
        f"classifier FID against the 1,000 held-out digits, whose real-vs-real floor at this n is "
        f"{floor:.2f} ± {steps_rows[0]['floor_std']:.2f}. See docs/metrics.md for what each number means.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'CPU'}; "
        f"the whole run took {minutes:.0f} minutes. Command: `.venv/bin/python benchmarks/steps_vs_quality.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        markdown(steps_rows, f"Every sampler, guidance {args.guidance:g}"),
        "![FID against NFE](quality.png)",
        sweep_table,
    ])
    (out / "quality.md").write_text(text + "\n")
    print(f"wrote {out / 'quality.md'} and {out / 'quality.png'} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
