"""How good are the digits after how many minutes of training? The time-to-quality curve.

    .venv/bin/python benchmarks/time_to_quality.py [--preset cpu] [--every 200] [--n 500] [--set field=value ...]

Trains a preset exactly as ``train.py`` does (same XLA flags, same loop,
checkpoints, sample grids and all) in a scratch run folder, noting the wall
clock at every step from the moment training is called (so data loading,
model building and compiling count), and keeps a checkpoint every ``--every``
steps. Afterwards (not timed) each checkpoint's EMA weights draw ``--n``
digits with the settings ``sample.py`` uses by default, and
``diffusion.metrics.evaluate_digits`` judges them: classifier accuracy and
classifier FID beside the real-vs-real floor at the same n.

Prints the curve as a table; with ``--out PREFIX`` also writes PREFIX.md (the
table, the machine and the command) and PREFIX.png (accuracy and FID against
minutes). ``--set`` changes training fields for recipe experiments, e.g.
``--set learning_rate=3e-3 --set batch_size=64`` (any field but the booleans),
and ``--baseline steps=1600`` trains a second recipe first for comparison,
of ``--baseline-preset`` if given.

A latent preset trains its own autoencoder first (``--autoencoder-preset``,
timed the same way, unless ``--set autoencoder=RUN`` names one): its minutes
count in the latent curve's, and are also stated apart. Latent against pixel
diffusion at equal wall clock (docs/latent.md):

    .venv/bin/python benchmarks/time_to_quality.py --preset latent --every 1000 \
        --baseline-preset cpu --baseline steps=2400 --baseline-every 600 --n 1000 --out docs/latent_vs_pixel
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from diffusion import cpu

cpu.configure()  # the XLA flag train.py trains with, before JAX starts
if __name__ == "__main__":
    cpu.restart_with_huge_pages()  # as train.py does

import jax  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from diffusion import checkpoint, cli, configs, evaluation, generate, runs, training  # noqa: E402


def make_run_config(preset: str, overrides: list[str], name: str, every: int, runs_dir: str) -> configs.Config:
    """The preset with FIELD=VALUE overrides read as train.py reads its flags, in a scratch folder,
    keeping every ``every``-th checkpoint."""
    flags = ["--preset", preset]
    for item in overrides:
        field, _, value = item.partition("=")
        flags += [f"--{field.replace('_', '-')}", value]
    config = cli.config_from_flags(flags)  # a wrong field or value: a UsageError or ConfigError saying which
    return dataclasses.replace(config, name=name, runs_dir=runs_dir, checkpoint_every=every, keep_checkpoints=10_000)


def train_timed(config: configs.Config) -> dict[int, float]:
    """Train ``config``; returns {step: seconds since training was called, at the end of that step}."""
    started, seconds = time.perf_counter(), {}
    training.train(config, callback=lambda step, _: seconds.__setitem__(step, time.perf_counter() - started))
    return seconds


def judge(path: Path, n: int, settings: dict) -> dict:
    """Accuracy and classifier FID of n digits from one checkpoint, drawn with sample.py's default settings."""
    opened = runs.open_checkpoint(path)
    return evaluation.evaluate(evaluation.digit_settings(opened, n, **settings), "test", opened)


def plot(curves: dict[str, list[dict]], title: str, png: Path) -> None:
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_acc, ax_fid, ax_rec = fig.subplots(1, 3)
    for label, rows in curves.items():
        minutes = [r["minutes"] for r in rows]
        ax_acc.plot(minutes, [100 * r["accuracy"] for r in rows], "o-", label=label)
        ax_fid.plot(minutes, [r["fid"] for r in rows], "o-", label=label)
        ax_rec.plot(minutes, [r["recall"] for r in rows], "o-", label=label)
    rows = next(iter(curves.values()))
    ax_acc.axhline(97, color="gray", ls="--", lw=1, label="97 % goal")
    ax_acc.set(xlabel="training time (minutes)", ylabel="classifier accuracy (%)", title="Conditional accuracy")
    ax_fid.plot([r["minutes"] for r in rows], [r["floor"] for r in rows], color="gray", ls="--", lw=1,
                label="real-vs-real floor")
    ax_fid.set(xlabel="training time (minutes)", ylabel="classifier FID", title="Classifier FID", yscale="log")
    ax_rec.axhline(rows[0]["floor_recall"], color="gray", ls="--", lw=1, label="real digits")
    ax_rec.set(xlabel="training time (minutes)", ylabel="recall", title="Recall (diversity)", ylim=(0, 1))
    for ax in (ax_acc, ax_fid, ax_rec):
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(png, dpi=110)


def curve(preset: str, overrides: list[str], name: str, every: int, args, settings: dict, runs_dir: str):
    """Train one recipe (a latent one after its autoencoder, unless it names one), keeping a checkpoint every
    ``every`` steps, then judge each checkpoint: (config, rows, the settings used)."""
    autoencoder_seconds = 0.0
    if issubclass(configs.config_class(preset), configs.LatentConfig) and not any(
            item.startswith("autoencoder=") for item in overrides):
        autoencoder = make_run_config(args.autoencoder_preset, [], f"{name}-autoencoder", 10**9, runs_dir)
        autoencoder_seconds = max(train_timed(autoencoder).values())
        overrides = [*overrides, f"autoencoder={autoencoder.run_dir}"]
        print(f"{name}: autoencoder trained in {autoencoder_seconds / 60:.1f} min", flush=True)
    config = make_run_config(preset, overrides, name, every, runs_dir)
    seconds = train_timed(config)
    rows = []
    for path in checkpoint.checkpoints(runs.checkpoint_dir(config.run_dir)):
        step = checkpoint.step_of(path)
        result = judge(path, args.n, settings)
        rows.append({"recipe": name, "step": step, "minutes": (autoencoder_seconds + seconds[step]) / 60,
                     "autoencoder_minutes": autoencoder_seconds / 60, **result})
        print(f"{name}: step {step:5d}  {rows[-1]['minutes']:5.1f} min  accuracy {result['accuracy']:.3f}  "
              f"FID {result['fid']:6.2f} (floor {result['floor']:.2f})  recall {result['recall']:.2f}", flush=True)
    used = generate.default_settings(runs.open_checkpoint(path), **settings)
    return config, rows, used


def describe(config: configs.Config, preset: str) -> str:
    """The preset and the fields in which ``config`` differs from it (leaving out the scratch folder's and what
    a run pins)."""
    scratch = ("kind", "name", "runs_dir", "checkpoint_every", "keep_checkpoints", "autoencoder") + config.NOT_FLAGS
    fields = {f.name: f.default for f in dataclasses.fields(config)} | configs.PRESETS[preset]
    preset_values = json.loads(json.dumps(fields))  # tuples as the lists of to_dict's JSON
    changed = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items()
               if k not in scratch and v != preset_values[k]}
    return f"preset {preset}{' with ' + json.dumps(changed) if changed else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=configs.PRESETS)
    parser.add_argument("--every", type=int, default=200, help="evaluate a checkpoint every this many steps")
    parser.add_argument("--n", type=int, default=500, help="digits per evaluation (a multiple of 10)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a training field")
    parser.add_argument("--baseline", action="append", metavar="FIELD=VALUE",
                        help="also train the preset with these overrides first, for a second curve beside it")
    parser.add_argument("--baseline-preset", help="the baseline's preset (default: --preset)")
    parser.add_argument("--baseline-every", type=int, help="the baseline's --every (default: --every)")
    parser.add_argument("--autoencoder-preset", default="autoencoder",
                        help="the preset of the autoencoder a latent recipe trains first (default: autoencoder)")
    parser.add_argument("--sampler", help="sampler for the evaluations (default: sample.py's)")
    parser.add_argument("--steps", type=int, help="sampling steps for the evaluations (default: sample.py's)")
    parser.add_argument("--guidance", type=float, help="guidance scale for the evaluations (default: sample.py's)")
    parser.add_argument("--guidance-interval", type=cli.sigma_interval, help="LOW,HIGH or none (default: sample.py's)")
    parser.add_argument("--out", help="write OUT.md and OUT.png (e.g. docs/time_to_quality)")
    args = parser.parse_args(argv)
    chosen = ("sampler", "steps", "guidance", "guidance_interval")
    settings = {k: getattr(args, k) for k in chosen if getattr(args, k) is not None}

    recipes = {"recipe": (args.preset, args.set, args.every)}
    if args.baseline or args.baseline_preset:
        baseline = (args.baseline_preset or args.preset, args.baseline or [], args.baseline_every or args.every)
        recipes = {"baseline": baseline, **recipes}
    curves, described = {}, []
    with tempfile.TemporaryDirectory() as runs_dir:
        for name, (preset, overrides, every) in recipes.items():
            config, rows, used = curve(preset, overrides, name, every, args, settings, runs_dir)
            label = describe(config, preset)
            if rows[0]["autoencoder_minutes"]:
                label += f" (its autoencoder trained first: {rows[0]['autoencoder_minutes']:.1f} min, counted in)"
            curves[f"{name}: preset {preset}"] = rows
            described.append(f"{name}: {label}")
    interval = "every step" if used.guidance_interval is None else "sigma {:g}–{:g}".format(*used.guidance_interval)
    sampling = f"{used.sampler} {used.steps} steps, guidance {used.guidance:g} ({interval}), n = {args.n}"
    lines = [
        "| recipe | step | minutes | accuracy | classifier FID | real floor | recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['recipe']} | {r['step']} | {r['minutes']:.1f} | {100 * r['accuracy']:.1f} % | {r['fid']:.1f} "
          f"| {r['floor']:.1f} | {r['recall']:.2f} |" for rows in curves.values() for r in rows),
    ]
    print("\n" + "\n".join(described) + "\n" + sampling + "\n" + "\n".join(lines))
    if args.out:
        out = Path(args.out)
        machine = f"{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.devices()[0].platform}"
        command = "python benchmarks/time_to_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out.with_suffix(".md").write_text("\n".join([
            "# Time to quality\n", *(f"- {d}" for d in described), "", f"Sampling: {sampling}.\n",
            f"Machine: {machine}. Command: `{command}`\n", *lines,
        ]) + "\n")
        plot(curves, f"Time to quality: {sampling}", out.with_suffix(".png"))
        rows = [r for rows in curves.values() for r in rows]
        out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
