"""Judging a checkpoint: generate digits with given settings and measure them against real ones.

``digit_settings`` lays out n digits (seeds counting up, each drawn once per
class, so n / 10 per class); ``evaluate`` generates them and judges them with
``diffusion.metrics.evaluate_digits`` against the 1,000 held-out real digits:
classifier accuracy, classifier FID beside its real-vs-real floor (the score of
a perfect generator at this n), precision and recall. ``evaluate.py`` and the
quality benchmarks are thin over these two. A model of other images (CIFAR-10,
a folder of your own) is judged by the sliced Wasserstein distance of its
pixels to real ones, beside that distance for real images
(``metrics.evaluate_pixels``): the digit classifier knows digits only.

``evaluate_prompts`` judges a text model the same way, and also whether each
digit has the attributes its prompt asked for: the share of digits whose
measured thickness, slant or size (``diffusion.captions``, cut where the
training captions were cut) falls in the bin the prompt names.
"""

from __future__ import annotations

import time

import numpy as np

from diffusion import captions, data, generate, metrics, runs, samplers
from diffusion.configs import TextConfig
from diffusion.errors import GenerationError



def digit_settings(checkpoint: runs.Checkpoint, n: int = 1000, first_seed: int = 0, **choices) -> generate.Settings:
    """n digits of ``checkpoint``, seeds counting up from ``first_seed``, each drawn once per class; ``choices``
    (Settings fields: sampler, steps, guidance, ...) over the checkpoint's defaults."""
    config = checkpoint.config
    if isinstance(config, TextConfig):
        raise GenerationError(
            "this lays out digits by class; a text model is judged by its prompts: "
            f"python benchmarks/text_prompts.py --checkpoint {checkpoint.path}"
        )
    classes = max(config.num_classes, 1)
    if n < 4 or n % classes:
        raise GenerationError(f"n must be at least 4 and a multiple of the {classes} classes (got {n})")
    seeds = tuple(range(first_seed, first_seed + n // classes))
    return generate.default_settings(checkpoint, seeds=seeds, **choices)


def judges_digits(config) -> bool:
    """Whether a run makes MNIST digits, which the digit classifier's metrics apply to."""
    return config.dataset in data.DIGIT_DATASETS and (config.image_size, config.in_channels) == (28, 1)


def real_images(config, reference: str = "test"):
    """Real images of a run's dataset that are not digits, for ``metrics.evaluate_pixels``: (reference, pool),
    two disjoint sets. A named dataset's ``reference`` split and its other split; a folder's images, which have
    one split, halved by a fixed shuffle."""
    if data.is_folder(config.dataset):
        images = data.load_run_data(config)[0]
        order = np.random.default_rng(0).permutation(len(images))
        return images[order[: len(images) // 2]], images[order[len(images) // 2 :]]
    other = "train" if reference == "test" else "test"
    return data.load_run_data(config, reference)[0], data.load_run_data(config, other)[0]


def evaluate(settings: generate.Settings, reference: str = "test", checkpoint: runs.Checkpoint | None = None) -> dict:
    """Generate the images of ``settings`` and measure them: the settings that matter, the metrics and the times.

    Digits are judged by ``metrics.evaluate_digits`` (accuracy, classifier FID, precision, recall); images of
    any other dataset by ``metrics.evaluate_pixels`` (sliced Wasserstein distance of the pixels, with its
    floor). ``checkpoint``: ``settings.checkpoint`` already opened, if it is.
    """
    checkpoint = checkpoint or runs.open_checkpoint(settings.checkpoint)
    started = time.perf_counter()
    generation = generate.generate(settings, checkpoint=checkpoint, progress=True)
    sampled = time.perf_counter()
    labels = None if generation.labels[0] is None else list(generation.labels)
    if judges_digits(checkpoint.config):
        results = metrics.evaluate_digits(generation.images, labels, reference=reference)
    else:
        results = metrics.evaluate_pixels(generation.images, *real_images(checkpoint.config, reference))
    return {
        "checkpoint": settings.checkpoint,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "spacing": settings.spacing or samplers.SAMPLERS[settings.sampler].spacing,  # None for flow samplers
        "shift": settings.shift,
        "guidance": settings.guidance,
        "guidance_interval": settings.guidance_interval,
        "first_seed": settings.seeds[0],
        "reference": reference,
        **results,
        "nfe": generation.nfe,
        "sampling_s": sampled - started,
        "metrics_s": time.perf_counter() - sampled,
    }


def _where(interval, scale) -> str:
    """Where guidance acts, as the table says it: ' in sigma [0.28, 5.42]', or nothing for every step."""
    return "" if interval is None or scale == 1 else f" in sigma [{interval[0]:g}, {interval[1]:g}]"


def _shifted(shift) -> str:
    """A flow grid's shift as the table says it: ', shift 3', or nothing for none."""
    return "" if shift is None else f", shift {shift:g}"


def table(row: dict) -> str:
    """The results as a small text table, each generated figure beside what real digits score."""

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    if "swd" in row:  # not digits
        return "\n".join([
            _header(row), "", f"{'':28}{'generated':>12}{'real images':>16}",
            f"{'sliced Wasserstein (pixels)':28}{row['swd']:>12.4f}{row['floor']:>9.4f} ± {row['floor_std']:.4f}",
            "", "(the digit classifier's metrics apply to digits only; this is not Inception FID)",
            _footer(row, "images"),
        ])
    rows = [
        ("", "generated", "real digits"),
        ("accuracy", number(row["accuracy"]), "-"),
        ("classifier FID", number(row["fid"], 2), f"{row['floor']:.2f} ± {row['floor_std']:.2f}"),
        ("precision", number(row["precision"]), number(row["floor_precision"])),
        ("recall", number(row["recall"]), number(row["floor_recall"])),
    ]
    return "\n".join([_header(row), "", *(f"{name:16}{ours:>12}{real:>16}" for name, ours, real in rows), "",
                      _footer(row, "digits")])


def _header(row: dict) -> str:
    return (
        f"{row['checkpoint']}: {row['sampler']} ({row['spacing'] or 'flow'} timesteps{_shifted(row.get('shift'))}), "
        f"{row['steps']} steps, "
        f"guidance {row['guidance']:g}{_where(row.get('guidance_interval'), row['guidance'])}, "
        f"{row['nfe']} network calls per image"
    )


def _footer(row: dict, what: str) -> str:
    return (
        f"n = {row['n']} against the {row['reference']} {what}; sampling {row['sampling_s']:.1f} s "
        f"({row['n'] / row['sampling_s']:.1f} {what}/s), metrics {row['metrics_s']:.1f} s"
    )


def attribute_cuts(config) -> dict:
    """The cuts of ``captions.attribute_thresholds`` on the training digits of ``config.dataset``: where the
    captions that the model was trained on put their bins."""
    images, labels = data.load_dataset(config.dataset, "train")
    return captions.attribute_thresholds(captions.measure(images), labels)


def attribute_report(images, digits, asked: list[dict], cuts: dict) -> dict:
    """Per attribute, over the images whose prompt names it: ``accuracy`` (the share in the bin asked for),
    ``count``, and ``margin``, the median signed distance into that bin (``captions.signed_margin``).

    images: uint8 digits (N, 28, 28[, 1]); digits: the digit each prompt asked for (its cuts for size).
    """
    measured = captions.measure(images)
    bins = captions.attribute_bins(measured, digits, cuts)
    report = {}
    for attribute, names in captions.BINS.items():
        picks = np.array([i for i, a in enumerate(asked) if attribute in a], np.int64)
        if not len(picks):
            continue
        wanted = np.array([asked[i][attribute] for i in picks])
        margins = np.empty(len(picks))
        for name in set(wanted):
            chosen = picks[wanted == name]
            margins[wanted == name] = captions.signed_margin(
                measured[attribute][chosen], digits[chosen], attribute, name, cuts
            )
        report[attribute] = {
            "accuracy": float(np.mean(bins[attribute][picks] == [names.index(w) for w in wanted])),
            "count": len(picks),
            "margin": float(np.median(margins)),
        }
    return report


def evaluate_prompts(checkpoint: runs.Checkpoint, prompts, num_seeds: int = 10, first_seed: int = 0,
                     cuts: dict | None = None, **choices) -> dict:
    """Draw every prompt with ``num_seeds`` seeds and judge the digits: digit accuracy and classifier FID as
    ``evaluate``, and per attribute the share in the bin asked for (``attribute_report``).

    ``choices`` are Settings fields (sampler, steps, guidance, negative_prompt, ...); ``cuts`` those of
    ``attribute_cuts`` if already computed.
    """
    seeds = tuple(range(first_seed, first_seed + num_seeds))
    settings = generate.default_settings(checkpoint, prompts=tuple(prompts), seeds=seeds, **choices)
    started = time.perf_counter()
    generation = generate.generate(settings, checkpoint=checkpoint, progress=True)
    sampled = time.perf_counter()
    tokenizer = checkpoint.config.tokenizer
    meanings = [captions.prompt_meaning(tokenizer.words(p)) for p in generation.labels]
    digits = np.array([digit for digit, _ in meanings])
    if any(digit is None for digit, _ in meanings):
        raise GenerationError("every prompt judged must name a digit (zero to nine)")
    pixels = data.from_model_range(generation.images)
    cuts = attribute_cuts(checkpoint.config) if cuts is None else cuts
    return {
        "checkpoint": settings.checkpoint,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "guidance_interval": settings.guidance_interval,
        "negative_prompt": settings.negative_prompt,
        "prompts": len(settings.prompts),
        **metrics.evaluate_digits(generation.images, list(digits)),
        "attributes": attribute_report(pixels, digits, [asked for _, asked in meanings], cuts),
        "sampling_s": sampled - started,
    }
