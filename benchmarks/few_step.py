"""The few-step table: distilled students at 1-8 steps beside their teacher at the same steps and at 25.

    .venv/bin/python benchmarks/few_step.py --students runs/consistency,runs/progressive-4,... [--n 1000]

Every row generates the same n digits (n/10 per class, the same seeds) with
``diffusion.evaluation`` (what ``evaluate.py`` runs) and records NFE, seconds
per 100 digits, classifier accuracy, MNIST-classifier FID (with its real-vs-real
floor), precision and recall:

- each consistency student with ``lcm`` at 1, 2, 4 and 8 steps, each progressive
  student with DDIM at the steps it was distilled for, all at the guidance scale
  ``--guidance`` (an input of the students: one network call per step);
- the teacher (the first student's) with DDIM (trailing spacing, the students'
  grids) and DPM++ 2M at 1, 2, 4 and 8 steps and at 25, guided at the same scale
  at every step, the map the students
  learnt (its guided call is two network evaluations on a doubled batch, counted
  once, as everywhere here); and at its own default settings (guidance interval).

Also the cost of each student: its training minutes, from its metrics.jsonl.
Writes ``<out>/few_step.md`` and the raw rows as ``<out>/few_step.jsonl``.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from diffusion import configs, evaluation, runs

STEPS = (1, 2, 4, 8)
TEACHER_STEPS = STEPS + (25,)


def run(checkpoint: runs.Checkpoint, n: int, model: str, **choices) -> dict:
    settings = evaluation.digit_settings(checkpoint, n, **choices)
    row = {"model": model, **evaluation.evaluate(settings, "test", checkpoint)}
    shown = ("model", "sampler", "steps", "guidance", "nfe", "accuracy", "fid", "recall", "sampling_s")
    print(json.dumps({k: row[k] for k in shown}), flush=True)
    return row


def training_minutes(checkpoint: runs.Checkpoint) -> float:
    """A run's training time: its steps at the images per second its last metrics line records."""
    lines = (runs.run_folder(checkpoint.path) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    config = checkpoint.config
    return config.steps * config.batch_size / last["images_per_s"] / 60


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", required=True, help="comma-separated run folders of distilled students")
    parser.add_argument("--n", type=int, default=1000, help="digits per row, a multiple of 10")
    parser.add_argument("--guidance", type=float, default=configs.DistillConfig.sample_guidance)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)

    students = [runs.open_checkpoint(path) for path in args.students.split(",")]
    for student in students:
        if student.kind != "distill":
            parser.error(f"{student.path} is a {student.kind} model, not a distilled student")
    teacher = runs.open_checkpoint(students[0].config.teacher)
    while teacher.kind == "distill":  # a progressive student's first ancestor
        teacher = runs.open_checkpoint(teacher.config.teacher)
    started = time.perf_counter()
    rows = []
    for student in students:
        config, name = student.config, student.run_name
        steps = STEPS if config.method == "consistency" else (config.student_steps,)
        rows += [run(student, args.n, name, steps=s, guidance=args.guidance) for s in steps]
    for sampler, spacing in (("ddim", "trailing"), ("dpmpp_2m", None)):  # DDIM on the students' grids
        rows += [run(teacher, args.n, "teacher", sampler=sampler, spacing=spacing, steps=s, guidance=args.guidance,
                     guidance_interval=None) for s in TEACHER_STEPS]
    rows.append(run(teacher, args.n, "teacher (its defaults)", steps=25))
    minutes = (time.perf_counter() - started) / 60

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "few_step.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    reference = next(r for r in rows if r["model"] == "teacher" and r["sampler"] == "ddim" and r["steps"] == 25)
    lines = [
        "| model | sampler | steps | NFE | s / 100 digits | accuracy | classifier FID | vs teacher DDIM 25 | precision "
        "| recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} ({r['spacing']}) | {r['steps']} | {r['nfe']} | {100 * r['sampling_s'] / r['n']:.1f} "
            f"| {r['accuracy']:.1%} | {r['fid']:.1f} | {r['fid'] / reference['fid'] - 1:+.0%} | {r['precision']:.2f} "
            f"| {r['recall']:.2f} |"
        )
    costs = ["| student | method | teacher steps | training steps | minutes |", "|---|---|---|---|---|"]
    for student in students:
        c = student.config
        costs.append(f"| {student.run_name} | {c.method} | {c.teacher_steps if c.method == 'progressive' else '-'} "
                     f"| {c.steps} | {training_minutes(student):.1f} |")
    text = "\n\n".join([
        "# Few-step students against their teacher",
        f"Teacher `{teacher.path}`; {args.n} digits per row ({args.n // 10} per class, seeds 0..{args.n // 10 - 1}); "
        f"guidance {args.guidance:g} at every step (the teacher's last row: its own defaults). Classifier FID "
        f"against the 1,000 held-out digits, whose real-vs-real floor at this n is {rows[0]['floor']:.2f} ± "
        f"{rows[0]['floor_std']:.2f}. A guided teacher step is two network evaluations on a doubled batch, counted "
        "as one NFE; a student's step is one.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'CPU'}; "
        f"the whole run took {minutes:.0f} minutes. Command: `.venv/bin/python benchmarks/few_step.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "\n".join(lines),
        "### What each student cost to train\n\n" + "\n".join(costs),
    ])
    (out / "few_step.md").write_text(text + "\n")
    print(f"wrote {out / 'few_step.md'} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
