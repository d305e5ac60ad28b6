"""The steps-vs-quality table: every sampler at the step counts people use, and a guidance sweep.

    .venv/bin/python benchmarks/steps_vs_quality.py [--checkpoint runs/default] [--n 1000] [--out docs] [--full]

For each (sampler, steps) it generates n digits (n/10 per class, the same seeds
for every row) with ``diffusion.evaluation`` (what ``evaluate.py`` runs), at the
checkpoint's default guidance (``generate.default_settings``) unless
``--guidance`` / ``--guidance-interval`` say otherwise, and records NFE,
seconds per 100 digits, classifier accuracy, MNIST-classifier FID (with its
real-vs-real floor), precision and recall. The rows are each sampler at its
usual setting (``USUAL``: DDIM, Euler, DPM++ 2M (Karras), UniPC at 10 and 20
steps, Heun at 10, PLMS at 20, DDPM and Euler a at 25 and 50, DPM++ SDE Karras
at 10 and 15, DPM++ 2M SDE Karras at 25), each marked by how far its FID is
from the best deterministic (or stochastic) row; ``--full`` adds every sampler
at 5 to 100 steps and DDPM at 1000. Then a guidance sweep: DPM++ 2M at 20
steps, scales 1 to 4, in the default interval and at every step.

Writes ``<out>/quality.md`` (the tables, the machine and the command),
``<out>/quality.png`` (FID against NFE per sampler) and the raw rows as
``<out>/quality.jsonl``. Flow samplers are skipped for models that are not flow
models, and vice versa.
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

from diffusion import cli, evaluation, generate, runs, samplers  # noqa: E402

# (sampler, steps) as image tools use them; the goals: deterministic rows within 15 % of the best deterministic
# FID, stochastic rows within 30 % of the best stochastic one.
USUAL = {
    "deterministic": [
        ("ddim", 10), ("ddim", 20), ("euler", 10), ("euler", 20), ("dpmpp_2m", 10), ("dpmpp_2m", 20),
        ("dpmpp_2m_karras", 10), ("dpmpp_2m_karras", 20), ("unipc", 10), ("unipc", 20), ("heun", 10),
        ("plms", 20),
    ],
    "stochastic": [
        ("ddpm", 25), ("ddpm", 50), ("euler_a", 25), ("euler_a", 50), ("dpmpp_sde_karras", 10),
        ("dpmpp_sde_karras", 15), ("dpmpp_2m_sde_karras", 25),
    ],
}
TOLERANCE = {"deterministic": 0.15, "stochastic": 0.30}
FULL_STEPS = (5, 10, 20, 50, 100)
GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)


def run(checkpoint: runs.Checkpoint, n: int, **choices) -> dict:
    settings = evaluation.digit_settings(checkpoint, n, **choices)
    row = evaluation.evaluate(settings, "test", checkpoint)
    row["guidance_interval"] = settings.guidance_interval
    shown = ("sampler", "steps", "guidance", "guidance_interval", "nfe", "accuracy", "fid", "recall", "sampling_s")
    print(json.dumps({k: row[k] for k in shown}), flush=True)
    return row


def _interval(row) -> str:
    interval = row["guidance_interval"]
    return "every step" if interval is None else f"sigma {interval[0]:g}–{interval[1]:g}"


def markdown(rows, title, first="sampler", name=lambda r: r["sampler"], verdict=None):
    extra = " | from the best FID" if verdict else ""
    lines = [
        f"### {title}",
        "",
        f"| {first} | steps | NFE | s / 100 digits | accuracy | classifier FID | precision | recall{extra} |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if verdict else ""),
    ]
    for r in rows:
        lines.append(
            f"| {name(r)} | {r['steps']} | {r['nfe']} | {100 * r['sampling_s'] / r['n']:.1f} | {r['accuracy']:.1%} "
            f"| {r['fid']:.1f} | {r['precision']:.2f} | {r['recall']:.2f}" + (f" | {verdict(r)} |" if verdict else " |")
        )
    return "\n".join(lines)


def plot_curves(rows: list[dict], floor: float, title: str, path: Path):
    """FID against NFE, a line per sampler: solid for deterministic samplers, dashed for stochastic ones."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]  # ten dark hues, then light
    for k, name in enumerate(sorted({r["sampler"] for r in rows})):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        spec = samplers.SAMPLERS[name]
        style = "s--" if spec.stochastic(dict(spec.options)) else "o-"
        ax.plot([r["nfe"] for r in mine], [r["fid"] for r in mine], style, color=colours[k % len(colours)], label=name)
    ax.axhline(floor, color="k", ls=":", label=f"real-vs-real floor ({floor:.1f})")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per digit (NFE)", ylabel="MNIST-classifier FID",
           title=title)
    ax.legend(fontsize=8, ncol=2, title="solid: deterministic, dashed: stochastic", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=runs.DEFAULT_RUN)
    parser.add_argument("--n", type=int, default=1000, help="digits per row, a multiple of 10")
    parser.add_argument("--guidance", type=float, help="guidance scale of the steps table (default: the model's)")
    parser.add_argument("--guidance-interval", type=cli.sigma_interval, help="LOW,HIGH or none (default: the model's)")
    parser.add_argument("--full", action="store_true", help="also every sampler at 5-100 steps and DDPM at 1000")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="leave out the guidance sweep")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)

    checkpoint = runs.open_checkpoint(args.checkpoint)
    flow = checkpoint.config.parameterization == "velocity"
    defaults = generate.default_settings(checkpoint)
    guidance = dict(
        guidance=defaults.guidance if args.guidance is None else args.guidance,
        guidance_interval=defaults.guidance_interval if args.guidance_interval is None else args.guidance_interval,
    )
    fits = {name for name, s in samplers.SAMPLERS.items() if (s.family == "flow") == flow}
    started = time.perf_counter()
    groups = {
        group: [run(checkpoint, args.n, sampler=name, steps=steps, **guidance) for name, steps in rows if name in fits]
        for group, rows in USUAL.items()
    }
    full_rows = []
    if args.full:
        full_rows = [run(checkpoint, args.n, sampler=name, steps=s, **guidance) for name in sorted(fits)
                     for s in FULL_STEPS]
        if not flow:
            full_rows.append(run(checkpoint, args.n, sampler="ddpm", steps=1000, **guidance))
    sweep_rows = []
    if args.sweep:
        intervals = dict.fromkeys([guidance["guidance_interval"] or (), ()])  # the default interval, then none
        sweep_rows = [
            run(checkpoint, args.n, sampler="flow_euler" if flow else "dpmpp_2m", steps=20, guidance=g,
                guidance_interval=interval)
            for interval in intervals
            for g in GUIDANCE_SWEEP
            if interval == () or g != 1.0  # at scale 1 the interval changes nothing
        ]
    minutes = (time.perf_counter() - started) / 60
    all_rows = [row for rows in groups.values() for row in rows] + full_rows + sweep_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in all_rows)

    curve_rows = [row for rows in groups.values() for row in rows] + full_rows
    title = f"FID against NFE at guidance {guidance['guidance']:g} ({_interval(all_rows[0])}), {args.n} digits"
    plot_curves(curve_rows, all_rows[0]["floor"], title, out / "quality.png")

    sections = []
    for group, rows in groups.items():
        best = min(r["fid"] for r in rows)
        allowed = TOLERANCE[group]

        def verdict(r, best=best, allowed=allowed):
            excess = r["fid"] / best - 1
            return f"+{excess:.0%} " + ("✓" if excess <= allowed else f"✗ (goal ≤ +{allowed:.0%})")

        sections.append(markdown(rows, f"{group.capitalize()} samplers at their usual step counts", verdict=verdict))
    if full_rows:
        sections.append(markdown(full_rows, "Every sampler from 5 to 100 steps"))
    if sweep_rows:
        sections.append(markdown(sweep_rows, f"Guidance sweep: {sweep_rows[0]['sampler']}, 20 steps", first="guidance",
                                 name=lambda r: f"{r['guidance']:g}, {_interval(r)}"))
    text = "\n\n".join([
        "# Steps against quality",
        f"Checkpoint `{args.checkpoint}`; {args.n} digits per row ({args.n // 10} per class, "
        f"seeds 0..{args.n // 10 - 1}); "
        f"guidance {guidance['guidance']:g} ({_interval(all_rows[0])}) unless the row says otherwise; classifier FID "
        f"against the 1,000 held-out digits, whose real-vs-real floor at this n is "
        f"{floor:.2f} ± {all_rows[0]['floor_std']:.2f}. See docs/metrics.md for what each number means.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'CPU'}; "
        f"the whole run took {minutes:.0f} minutes. Command: `.venv/bin/python benchmarks/steps_vs_quality.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        *sections,
        "![FID against NFE](quality.png)",
    ])
    (out / "quality.md").write_text(text + "\n")
    print(f"wrote {out / 'quality.md'} and {out / 'quality.png'} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
