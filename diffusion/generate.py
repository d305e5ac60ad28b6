"""Generating images from a trained checkpoint, reproducibly: the library behind sample.py and evaluate.py.

A run is described by one small frozen ``Settings`` (checkpoint, sampler,
steps, seeds, labels, guidance, img2img / inpainting inputs); ``generate``
turns it into images, and every PNG written by ``save`` carries the settings
as JSON in a text chunk (key ``diffusion-settings``), so ``read_settings`` on
the PNG and ``generate`` again give the same pixels, bit for bit, on the same
machine (with the same versions of JAX and XLA, and the same XLA_FLAGS). The
sha256 of the checkpoint and of the input images are part of the settings, so
a file that has changed since is caught instead of silently giving other bits.

What decides each image:

- **Noise.** The initial noise of seed s is ``jax.random.normal(jax.random.key(s),
  (H, W, C))``, whatever else is in the batch; with ``interpolate`` the noises
  run from seed A's to seed B's along the great circle between them (``slerp``).
- **Labels or prompts.** Every noise is drawn once per label in ``labels`` (the
  grid has one column per label), or for a text model once per prompt in
  ``prompts``, so rows compare conditions on the same noise. A text model's
  guidance pushes away from ``negative_prompt`` (the empty prompt if None), a
  label model's from ``negative_label`` (the null label if None).
- **Adapters.** LoRA adapters (``loras``: each a file and a scale) go on the
  checkpoint's model in the order given and are merged into its weights
  (``diffusion.lora``); an adapter's new classes are numbered after the base's.
- **Sampler noise.** The images go through the sampler in the fewest batches
  of at most ``batch_size`` images, of even size (the last padded to the same
  shape, so that one compiled program serves them all). Stochastic samplers
  (ddpm, euler_a, churn) and inpainting draw their per-step noise for a whole
  batch, from ``fold_in(key(seeds[0]), batch index)``: there an image also
  depends on its batch.

Sampling is ``diffusion.samplers`` on the model that ``diffusion.runs`` loads,
guided by ``diffusion.guidance`` and edited by ``diffusion.editing``, from the
noise of ``diffusion.noise``; pictures are encoded by ``diffusion.pictures`` and
written by ``diffusion.files``. This module only validates, arranges and saves.
Every bad input raises an InputError (a ``GenerationError``, or a
``CheckpointError`` for the checkpoint) that says what to change, before
anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion import captions, editing, files, guidance, latent, lora, pictures, noise, runs, samplers, watermark
from diffusion.configs import Config, LatentConfig, TextConfig
from diffusion.errors import GenerationError, is_whole
from diffusion.schedules import timestep_at
from diffusion.unet import as_denoiser

PNG_KEY = "diffusion-settings"  # the PNG text chunk that holds the settings as JSON
MAX_SEED = 2**32 - 1  # jax.random.key wraps larger seeds around: 2**32 would repeat seed 0
# The default guidance of a class-conditional model: scale 1.75 in the sigma interval (0.28, 5.42] of Kynkäänniemi
# et al. 2024 (their EDM2 setting), chosen by classifier FID, recall and accuracy (docs/quality.md).
DEFAULT_GUIDANCE = 1.75
DEFAULT_GUIDANCE_INTERVAL = (0.28, 5.42)
# A text model's default, in the same interval: a prompt names attributes as well as a digit, and following them
# takes a stronger push (scale 3: 98 % digits and 80-82 % of attributes as asked, against 96 % and 76-82 % at
# 1.75; docs/prompts.md).
DEFAULT_TEXT_GUIDANCE = 3.0


def _need(ok, message):
    if not ok:
        raise GenerationError(message)


# --- Settings ---------------------------------------------------------------------------

_TEXT, _OPTIONAL_TEXT = str, (str, type(None))
_KIND_NAMES = {_TEXT: "text", _OPTIONAL_TEXT: "text or null", bool: "true or false"}
_FIELD_TYPES = {  # the fields whose type __post_init__ checks directly; numbers get range checks of their own
    "checkpoint": _TEXT,
    "sampler": _TEXT,
    "spacing": _OPTIONAL_TEXT,
    "negative_prompt": _OPTIONAL_TEXT,
    "init_image": _OPTIONAL_TEXT,
    "mask": _OPTIONAL_TEXT,
    "resize": bool,
    "trajectory": bool,
    "watermarked": bool,
    "checkpoint_sha256": _OPTIONAL_TEXT,
    "init_image_sha256": _OPTIONAL_TEXT,
    "mask_sha256": _OPTIONAL_TEXT,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides a generation run; saved as JSON in every PNG it writes.

    The images are every initial noise (one per seed, or ``interpolate`` noises
    from seeds[0] to seeds[1]) times every label. Construction checks what can
    be checked without the model; ``check_settings`` the rest.
    """

    checkpoint: str  # a checkpoint folder, runs/<name>/checkpoints/step_XXXXXXXX
    sampler: str
    steps: int
    seeds: tuple[int, ...]  # one noise per seed; with interpolate, the two end points
    labels: tuple[int | None, ...]  # the class of each grid column; None: the null label (no class)
    prompts: tuple[str, ...] | None = None  # a text model: the prompt of each grid column (then labels = (None,))
    negative_prompt: str | None = None  # a text model: what guidance pushes away from; None: the empty prompt
    guidance: float = 1.0  # classifier-free guidance scale; 1 = none
    guidance_interval: tuple[float, float] | None = None  # (sigma low, sigma high): guide only there; None: always
    negative_label: int | None = None  # the condition guidance pushes away from; None: the null label
    spacing: str | None = None  # the timestep spacing; None: the sampler's default
    shift: float | None = None  # a flow model: the SD3 / Flux timestep shift of its grid; None: 1, no shift
    interpolate: int = 0  # > 0: this many noises on the great circle from seeds[0] to seeds[1]
    init_image: str | None = None  # img2img (with strength) or inpainting (with mask)
    strength: float | None = None  # img2img: 0 keeps init_image, 1 samples afresh (SDEdit)
    mask: str | None = None  # inpainting: white = generate anew, black = keep init_image
    resize: bool = False  # resize init_image and mask to the model's size (else a mismatch is an error)
    trajectory: bool = False  # also save the x_t / predicted-x0 strip and a GIF of the denoising
    watermarked: bool = False  # the noise carries a Tree-Ring key (diffusion.watermark); the key itself is secret
    loras: tuple[tuple[str, float, str], ...] = ()  # LoRA adapters on the checkpoint: (adapter file, scale, sha256)
    batch_size: int = 64  # the most images in one compiled batch
    checkpoint_sha256: str | None = None  # of state.npz; checked when given
    init_image_sha256: str | None = None
    mask_sha256: str | None = None

    def __post_init__(self):
        for name in ("seeds", "labels", "prompts"):  # lists from JSON become tuples
            value = getattr(self, name)
            if value is None and name == "prompts":
                continue
            _need(isinstance(value, (list, tuple)), f"{name} must be a list (got {value!r})")
            object.__setattr__(self, name, tuple(value))
        if self.prompts is not None:
            _need(self.prompts, "give at least one prompt")
            _need(all(isinstance(p, str) for p in self.prompts), f"prompts are text (got {list(self.prompts)!r})")
            _need(self.labels == (None,), "a grid has prompts or labels, not both: leave the labels out")
        _need(isinstance(self.loras, (list, tuple)), f"loras must be a list (got {self.loras!r})")
        loras = []
        for entry in self.loras:
            _need(
                isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], (str, os.PathLike))
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and math.isfinite(entry[1])
                and isinstance(entry[2], str),
                f"each LoRA is (adapter file, scale, sha256) (got {entry!r})",
            )
            loras.append((os.fspath(entry[0]), float(entry[1]), entry[2]))
        object.__setattr__(self, "loras", tuple(loras))
        if self.guidance_interval == ():  # what the command line's "none" gives: guidance at every step
            object.__setattr__(self, "guidance_interval", None)
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            _need(
                isinstance(interval, (list, tuple)) and len(interval) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                and 0 <= interval[0] < interval[1],
                f"the guidance interval is two noise levels sigma, 0 <= low < high (got {interval!r})",
            )
            object.__setattr__(self, "guidance_interval", (float(interval[0]), float(interval[1])))
        for name in ("checkpoint", "init_image", "mask"):  # pathlib paths are welcome, but JSON holds text
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            _need(isinstance(value, kind), f"{name} must be {_KIND_NAMES[kind]} (got {value!r})")
        _need(is_whole(self.steps, 1), f"steps must be a whole number >= 1 (got {self.steps!r})")
        _need(is_whole(self.batch_size, 1), f"batch_size must be a whole number >= 1 (got {self.batch_size!r})")
        _need(self.seeds, "give at least one seed")
        for seed in self.seeds:
            _need(
                is_whole(seed, 0) and seed <= MAX_SEED, f"seeds are whole numbers from 0 to {MAX_SEED} (got {seed!r})"
            )
        _need(self.labels, "give at least one label (None for the null label)")
        for label in (*self.labels, self.negative_label):
            _need(label is None or is_whole(label, 0), f"labels are whole numbers >= 0 or None (got {label!r})")
        _need(
            isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0,
            f"the guidance scale must be a number >= 0 (got {self.guidance!r}); 1 means no guidance",
        )
        _need(is_whole(self.interpolate, 0), f"interpolate must be a whole number >= 0 (got {self.interpolate!r})")
        if self.interpolate:
            _need(
                len(self.seeds) == 2 and self.seeds[0] != self.seeds[1],
                f"interpolation runs between two different seeds (got {list(self.seeds)})",
            )
            _need(
                self.interpolate >= 2, f"interpolation needs at least 2 images, its two ends (got {self.interpolate})"
            )
        if self.strength is not None:
            _need(
                isinstance(self.strength, (int, float)) and 0.0 <= self.strength <= 1.0,
                f"strength must be in [0, 1] (got {self.strength!r}): 0 keeps the image, 1 samples afresh",
            )
        if self.init_image is None:
            _need(self.strength is None and self.mask is None, "strength and mask need an init image to work on")
        else:
            _need(
                (self.strength is None) != (self.mask is None),
                "with an init image give either a strength (img2img) or a mask (inpainting), not both or neither",
            )
        _need(
            not (self.watermarked and self.init_image is not None),
            "a watermark lives in the starting noise, and img2img and inpainting start from an image: leave one out",
        )
        if self.shift is not None:
            _need(
                isinstance(self.shift, (int, float)) and not isinstance(self.shift, bool) and math.isfinite(self.shift)
                and self.shift > 0,
                f"shift must be a number > 0 (got {self.shift!r}); 1 means no shift",
            )
            object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "guidance", float(self.guidance))  # 3 and 3.0 must save the same JSON
        if self.strength is not None:
            object.__setattr__(self, "strength", float(self.strength))

    @property
    def num_noises(self) -> int:
        return self.interpolate or len(self.seeds)

    @property
    def columns(self) -> tuple:
        """The condition of each grid column: the prompts of a text model, else the labels."""
        return self.labels if self.prompts is None else self.prompts

    @property
    def num_images(self) -> int:
        return self.num_noises * len(self.columns)

    def to_json(self) -> str:
        """The settings as one line of ASCII JSON (a PNG tEXt chunk holds Latin-1 only)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """Settings from ``to_json``'s output; raises GenerationError if they are not valid settings."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise GenerationError(f"the settings are not valid JSON ({error})") from None
        _need(isinstance(values, dict), "the settings must be a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        _need(not unknown, f"unknown settings {', '.join(unknown)}: written by another version of this code?")
        try:
            return cls(**values)
        except TypeError as error:  # a required setting is missing
            raise GenerationError(f"incomplete settings: {error}") from None


def adapted(config: Config, adapters: list[runs.Adapter]) -> Config:
    """The config of ``config``'s model with ``adapters`` on it: its classes and theirs new ones."""
    return dataclasses.replace(config, num_classes=config.num_classes + sum(a.config.adapter.new_classes
                                                                          for a in adapters))


def open_adapters(settings: Settings) -> list[runs.Adapter]:
    """The adapters that ``settings`` name, opened, each checked unchanged since the settings were made."""
    opened = [runs.open_adapter(path) for path, _, _ in settings.loras]
    for adapter, (path, _, sha256) in zip(opened, settings.loras):
        _check_unchanged("adapter", path, sha256, adapter.sha256)
    return opened


def default_settings(checkpoint: runs.Checkpoint, **choices) -> Settings:
    """Settings for ``checkpoint`` with the usual defaults, then ``choices`` (Settings fields) applied.

    Defaults: DDIM (flow Euler for a flow-matching model; for a distilled student the
    sampler, steps and guidance it was distilled for), 25 steps, seed 0,
    every class of a class-conditional model (the null label otherwise; for a
    text model the prompts ``captions.EXAMPLE_PROMPTS``), and for a conditional
    model guidance ``DEFAULT_GUIDANCE`` (a text model: ``DEFAULT_TEXT_GUIDANCE``) in
    ``DEFAULT_GUIDANCE_INTERVAL``; the sha256 of the
    checkpoint's weights and of the input images.
    """
    runs.check_generative(checkpoint)
    config = adapted(checkpoint.config, [runs.open_adapter(path) for path, _, _ in choices.get("loras", ())])
    for name in ("init_image", "mask"):
        if choices.get(name) is not None:
            choices.setdefault(f"{name}_sha256", _input_sha256(choices[name], name.replace("_", " ")))
    text = isinstance(config, TextConfig)
    defaults = dict(
        checkpoint=str(checkpoint.path),
        checkpoint_sha256=checkpoint.sha256,
        sampler="flow_euler" if config.parameterization == "velocity" else "ddim",
        steps=25,
        seeds=(0,),
        # Every class, or the example prompts; none if the other kind of condition is given (check_settings says).
        labels=tuple(range(config.num_classes)) if config.num_classes and "prompts" not in choices else (None,),
        prompts=captions.EXAMPLE_PROMPTS if text and "labels" not in choices else None,
        guidance=DEFAULT_TEXT_GUIDANCE if text else DEFAULT_GUIDANCE if config.num_classes else 1.0,
    )
    # The default interval goes with guidance; an unguided run (guidance 1) has none.
    guided = choices.get("guidance", defaults["guidance"]) != 1.0
    defaults["guidance_interval"] = DEFAULT_GUIDANCE_INTERVAL if guided else None
    if config.kind == "distill":  # the sampler, steps and guidance scale it was distilled for, no interval
        defaults.update(
            sampler=config.sampling["sampler"], steps=config.student_steps, spacing=config.sampling.get("spacing"),
            guidance=config.sample_guidance, guidance_interval=None,
        )
    return Settings(**{**defaults, **choices})


def check_settings(settings: Settings, config: Config) -> None:
    """Raise a GenerationError if ``settings`` do not fit the model that ``config`` describes."""
    classes = config.num_classes
    flow = config.parameterization == "velocity"
    _need(
        settings.sampler in samplers.SAMPLERS,
        f"unknown sampler {settings.sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}",
    )
    fitting = [name for name, s in samplers.SAMPLERS.items() if (s.family == "flow") == flow]
    kind = "flow-matching" if flow else f"{config.parameterization}-prediction"
    _need(
        settings.sampler in fitting,
        f"sampler {settings.sampler} does not fit this checkpoint, a {kind} model: use one of {', '.join(fitting)}",
    )
    _need(not (flow and settings.spacing), f"{settings.sampler} steps evenly in flow time t: give no spacing")
    _need(
        flow or settings.shift is None,
        f"a shift moves a flow model's grid of times t; this checkpoint is a {kind} model: leave --shift out",
    )
    consistency = config.kind == "distill" and config.method == "consistency"
    _need(
        settings.sampler != "lcm" or consistency,
        "the lcm sampler needs a consistency model (its network's x0_hat is only a consistency function if it "
        f"was trained as one), and this checkpoint's run trained a {_trained_as(config)}: use ddim, or distil one "
        "with train.py --preset consistency --teacher RUN",
    )
    if settings.watermarked:
        _check_watermarkable(settings, config)
    if config.kind == "distill":
        _need(
            config.guidance_min <= settings.guidance <= config.guidance_max,
            (f"this student was distilled at guidance scale {config.guidance_min:g} only: leave --guidance out "
             if config.guidance_min == config.guidance_max else
             f"this student was distilled at guidance scales {config.guidance_min:g} to {config.guidance_max:g}: "
             "give a --guidance in that range ") + f"(got {settings.guidance:g})",
        )
        _need(
            settings.negative_label is None and settings.guidance_interval is None,
            "a distilled student has its teacher's guidance built in: it takes no negative label and no "
            "guidance interval",
        )
    try:
        # The sampler's own checks: steps, spacing, zero terminal SNR.
        samplers.make_plan(settings.sampler, spacing=settings.spacing, **_model_settings(settings, config))
    except ValueError as error:
        raise GenerationError(str(error)) from None
    if isinstance(config, TextConfig):
        _need(
            settings.labels == (None,) and settings.negative_label is None,
            "this model is steered by text prompts, not class labels: give --prompt (and --negative-prompt)",
        )
        _need(settings.prompts is not None, "this model is steered by text prompts: give at least one prompt")
        for prompt in (*settings.prompts, settings.negative_prompt or ""):
            config.tokenizer.encode(prompt)  # an unknown word or a prompt too long: an InputError that says which
    else:
        _need(
            settings.prompts is None and settings.negative_prompt is None,
            "this model takes class labels, not text prompts: give --label (and --negative-label)"
            if classes else "this model is unconditional: it takes no prompts",
        )
        if not classes:
            _need(
                settings.labels == (None,) and settings.negative_label is None,
                "this model is unconditional (trained without labels): give no labels",
            )
            _need(settings.guidance == 1.0, "classifier-free guidance needs a class-conditional model: use guidance 1")
    for label in (*settings.labels, settings.negative_label):
        _need(
            label is None or label < classes,
            f"label {label} is outside the classes this model was trained on (0 to {classes - 1}); "
            "use none for the null label",
        )
    negative = "prompt" if settings.negative_prompt is not None else "label"
    _need(
        (settings.negative_label is None and settings.negative_prompt is None) or settings.guidance != 1.0,
        f"a negative {negative} acts through guidance: give a guidance scale other than 1",
    )
    _need(
        settings.guidance_interval is None or settings.guidance != 1.0,
        "a guidance interval says where guidance acts: give a guidance scale other than 1, or no interval",
    )


def _check_watermarkable(settings: Settings, config: Config) -> None:
    """A watermark is found again by inverting DDIM: the model must allow that, and the sampler must follow a
    deterministic path from the marked noise."""
    watermark.check_detectable(config)
    deterministic = [
        name for name, s in samplers.SAMPLERS.items() if s.family != "flow" and not s.stochastic(dict(s.options))
    ]
    _need(
        settings.sampler in deterministic,
        f"a watermark is detected by following the sampler's path back to the noise, and {settings.sampler} draws "
        f"fresh noise at every step: use one of {', '.join(deterministic)}",
    )


def _trained_as(config: Config) -> str:
    if config.kind == "distill":
        return f"{config.method} student"
    return f"{config.kind} model ({config.parameterization}-prediction)"


def _model_settings(settings: Settings, config: Config) -> dict:
    """The schedule, steps and parameterization that ``diffusion.samplers`` needs for this model (and for the
    lcm sampler the origin grid it was distilled on, for a flow model its shift)."""
    flow = config.parameterization == "velocity"
    schedule = None if flow else config.noise_schedule
    lcm = dict(origin_steps=config.origin_steps) if settings.sampler == "lcm" and config.kind == "distill" else {}
    shift = dict(shift=settings.shift) if flow else {}
    return dict(schedule=schedule, steps=settings.steps, parameterization=config.parameterization, **lcm, **shift)


# --- Inputs -------------------------------------------------------------------------------------


def _input_sha256(path, what: str) -> str:
    try:
        return files.sha256_of(path)
    except FileNotFoundError:
        raise GenerationError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise GenerationError(f"{what} {path} cannot be read ({error})") from None


def _check_unchanged(what: str, path, expected: str | None, actual: str):
    _need(
        expected is None or expected == actual,
        f"{what} {path} has changed since these settings were saved (its sha256 differs), "
        "so the images would not be the same",
    )


def initial_noise(settings: Settings, shape) -> jax.Array:
    """The noises of a run, (num_noises, *shape): one per seed, or the slerp path between two seeds."""
    drawn = noise.seed_noise(settings.seeds, shape)
    if not settings.interpolate:
        return drawn
    return jnp.stack([noise.slerp(drawn[0], drawn[1], w) for w in np.linspace(0.0, 1.0, settings.interpolate)])


def arrangement(settings: Settings):
    """(noise index, column index) of each image, in grid order, and the grid's number of columns.

    A grid has one row per seed and one column per label or prompt
    (near-square when there is a single one); an interpolation one row per
    label or prompt, the noise moving along it.
    """
    columns = len(settings.columns)
    noises, labels = np.meshgrid(np.arange(settings.num_noises), np.arange(columns), indexing="ij")
    if settings.interpolate:
        return noises.T.ravel(), labels.T.ravel(), settings.interpolate
    ncols = columns if columns > 1 else math.ceil(math.sqrt(settings.num_noises))
    return noises.ravel(), labels.ravel(), ncols


# --- Generating ------------------------------------------------------------------------------


class Generation(NamedTuple):
    """What ``generate`` returns, in grid order.

    images (n, H, W, C) float32 in the model's range (not clipped); labels the
    class of each (None: null label), or its prompt for a text model; ncols the grid's columns; nfe network
    evaluations per image (a guided call counts once); with ``trajectory``,
    xs (frames, n, H, W, C) the x_t of every frame and x0s (frames - 1, n, ...)
    each step's prediction of x_0, for a latent model both decoded, and latents
    (frames, n, h, w, c) the x_t themselves.
    """

    images: np.ndarray
    labels: tuple
    ncols: int
    nfe: int
    xs: np.ndarray | None = None
    x0s: np.ndarray | None = None
    latents: np.ndarray | None = None


def guidance_times(interval: tuple[float, float], config: Config) -> tuple[float, float]:
    """A guidance interval of noise levels sigma in the model's own time: the fractional timesteps of those
    sigmas on the schedule, or for a flow model t = sigma / (1 + sigma) (where x_t / (1 - t) = x_0 + sigma eps)."""
    if config.parameterization == "velocity":
        return tuple(sigma / (1.0 + sigma) for sigma in interval)
    return tuple(float(timestep_at(config.noise_schedule, max(sigma, 1e-12))) for sigma in interval)


def guided_denoiser(model, settings: Settings, config: Config):
    """The model as the samplers' denoiser, with classifier-free guidance (Ho & Salimans 2021) if asked for,
    in the sigma interval of ``settings`` (Kynkäänniemi et al. 2024) if there is one.

    The model goes in as a pytree (``as_denoiser``), and the negative label (or
    the negative prompt's token ids) as an array, so both are arguments of the
    compiled sampler, not constants.
    """
    denoiser, _ = as_denoiser(model)
    if config.kind == "distill":  # the scale is an input of the network (Meng et al. 2023; LCM)
        return guidance.embedded_guidance(denoiser, settings.guidance)
    if settings.guidance == 1.0:
        return denoiser
    if isinstance(config, TextConfig):
        negative = config.tokenizer.encode(settings.negative_prompt or "")
    else:
        negative = model.num_classes if settings.negative_label is None else settings.negative_label
    interval = None if settings.guidance_interval is None else guidance_times(settings.guidance_interval, config)
    return guidance.classifier_free_guidance(
        denoiser, settings.guidance, jnp.asarray(negative, jnp.int32), interval=interval
    )


def _sample_batch(settings, config, denoiser, x_T, cond, key, x_known, mask):
    """One batch through the sampler, img2img (SDEdit) or inpainting, as ``settings`` say."""
    common = dict(
        sampler=settings.sampler,
        spacing=settings.spacing,
        key=key,
        cond=cond,
        return_trajectory=settings.trajectory,
        **_model_settings(settings, config),
    )
    if settings.strength is not None:
        return editing.img2img(
            denoiser, jnp.broadcast_to(x_known, x_T.shape), x_T, strength=settings.strength, **common
        )
    if settings.mask is not None:
        return editing.inpaint(denoiser, jnp.broadcast_to(x_known, x_T.shape), mask, x_T, **common)
    return samplers.sample(denoiser, x_T, **common)


def generate(
    settings: Settings, *, checkpoint: runs.Checkpoint | None = None, progress: bool = False,
    watermark_key: watermark.Key | None = None,
) -> Generation:
    """Generate the images that ``settings`` describe; see the module docstring for what decides each.

    Everything is checked first (checkpoint, its sha256, the settings against
    the model, the input images): a problem raises an InputError before
    anything compiles. ``checkpoint``, if given, is ``settings.checkpoint``
    already opened (``runs.open_checkpoint``), so that it is not resolved and
    hashed again. ``progress`` shows a progress bar over the batches (on a
    terminal). ``watermark_key`` marks every starting noise (``diffusion.watermark.mark``); it is needed exactly
    when ``settings.watermarked``.
    """
    if checkpoint is None or str(checkpoint.path) != settings.checkpoint:
        checkpoint = runs.open_checkpoint(settings.checkpoint)
    _check_unchanged("checkpoint", checkpoint.path, settings.checkpoint_sha256, checkpoint.sha256)
    runs.check_generative(checkpoint)
    adapters = open_adapters(settings)
    _need(not adapters or checkpoint.kind == "denoiser",
          f"LoRA adapters here go on a class-conditional pixel-space denoiser; {checkpoint.path} holds a "
          f"{checkpoint.kind} model")
    config = adapted(checkpoint.config, adapters)
    check_settings(settings, config)
    _need(
        settings.watermarked == (watermark_key is not None),
        "these settings are of a watermarked generation: give its key (--watermark-key) to make it again"
        if settings.watermarked else "these settings are of an unmarked generation: leave the watermark key out",
    )
    size, channels = config.image_size, config.in_channels
    in_latents = isinstance(config, LatentConfig)
    space = runs.load_latent_space(config, runs.run_folder(checkpoint.path)) if in_latents else None
    x_known = mask = None
    if settings.init_image is not None:
        x_known = pictures.load_image(settings.init_image, size, channels, settings.resize)
        actual = files.sha256_of(settings.init_image)
        _check_unchanged("init image", settings.init_image, settings.init_image_sha256, actual)
        if space is not None:  # img2img and inpainting start from the image's latent
            x_known = space.encode(x_known[None])[0]
    if settings.mask is not None:
        mask = pictures.load_mask(settings.mask, size, settings.resize)
        _check_unchanged("mask", settings.mask, settings.mask_sha256, files.sha256_of(settings.mask))
        if space is not None:
            mask = latent.latent_mask(mask, space.factor)
    model = runs.load_model(checkpoint)
    for adapter, (_, scale, _) in zip(adapters, settings.loras):
        runs.attach(model, checkpoint, adapter, scale)
    lora.merge(model)  # the adapters' updates go into the base weights: a sampler step costs what the base's does

    denoiser = guided_denoiser(model, settings, config)
    noise_index, column_index, ncols = arrangement(settings)
    labels = tuple(settings.columns[i] for i in column_index)
    x_T = initial_noise(settings, (config.unet.image_size, config.unet.image_size, config.unet.in_channels))
    x_T = x_T[noise_index]
    if watermark_key is not None:
        x_T = watermark.mark(x_T, watermark_key)
    cond = filler = None  # the condition of each image, and of the padding of the last batch
    if isinstance(config, TextConfig):
        cond, filler = config.tokenizer.encode_all(labels), config.tokenizer.empty_ids
    elif config.num_classes:
        null = config.num_classes
        cond, filler = np.array([null if c is None else c for c in labels], np.int32), null
    n = len(labels)
    batch = math.ceil(n / math.ceil(n / settings.batch_size))  # the fewest batches batch_size allows, even in size
    samples, xs, x0s, latents = [], [], [], []
    def pixels(x):  # a batch of samples as images: a latent model's decoded
        return np.asarray(x if space is None else space.decode(x))

    def pixel_frames(f):  # (frames, batch, ...) likewise
        return pixels(f.reshape(-1, *f.shape[2:])).reshape(*f.shape[:2], size, size, channels)

    with tqdm(total=n, desc="sampling", unit="image", disable=None if progress else True) as bar:
        for index, start in enumerate(range(0, n, batch)):
            part = slice(start, start + batch)
            keep = len(x_T[part])
            pad = batch - keep  # the last batch is padded, so that one compiled program serves them all
            batch_x_T = jnp.concatenate([x_T[part], jnp.zeros((pad, *x_T.shape[1:]), x_T.dtype)])
            batch_cond = None
            if cond is not None:
                batch_cond = np.concatenate([cond[part], np.broadcast_to(filler, (pad, *cond.shape[1:]))])
            key = jax.random.fold_in(jax.random.key(settings.seeds[0]), index)
            result = _sample_batch(settings, config, denoiser, batch_x_T, batch_cond, key, x_known, mask)
            samples.append(pixels(result.x)[:keep])
            if settings.trajectory:
                xs.append(pixel_frames(result.xs)[:, :keep])
                x0s.append(pixel_frames(result.x0s)[:, :keep])
                latents.append(np.asarray(result.xs[:, :keep]))
            bar.update(keep)
    frames = (np.concatenate(xs, axis=1), np.concatenate(x0s, axis=1)) if settings.trajectory else ()
    if settings.trajectory and space is not None:
        frames += (np.concatenate(latents, axis=1),)
    return Generation(np.concatenate(samples), labels, ncols, result.nfe, *frames)


# --- Files -------------------------------------------------------------------------------------


def read_settings(path) -> Settings:
    """The settings saved in a PNG written by ``save``; GenerationError if it holds none."""
    text = pictures.png_text(path, PNG_KEY)
    _need(
        text is not None,
        f"{path} holds no generation settings (no {PNG_KEY!r} text chunk): it was not written by sample.py",
    )
    try:
        return Settings.from_json(text)
    except GenerationError as error:
        raise GenerationError(f"{path}: {error}") from None


def save(generation: Generation, settings: Settings, path) -> list[Path]:
    """Write the grid as the PNG ``path``; with a trajectory also ``<stem>_trajectory.png`` (x_t and predicted
    x0 per step, and a latent model's latents, ``pictures.trajectory_strip``) and ``<stem>.gif`` (the grid over
    the steps).

    Every file carries ``settings``, all are written atomically; returns the paths written.
    """
    path, text = Path(path), {PNG_KEY: settings.to_json()}
    written = {path: pictures.png_bytes(pictures.image_grid(generation.images, generation.ncols), text)}
    if generation.xs is not None:
        strip = pictures.trajectory_strip(generation.xs, generation.x0s, generation.latents)
        written[path.with_name(f"{path.stem}_trajectory.png")] = pictures.png_bytes(strip, text)
        frames = [pictures.image_grid(x, generation.ncols) for x in generation.xs]
        written[path.with_suffix(".gif")] = pictures.gif_bytes(frames, settings.to_json())
    files.write_atomically(written)
    return list(written)
