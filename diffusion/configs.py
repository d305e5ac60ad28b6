"""What a run is: the settings of a training run (``Config``), the presets, and their checks.

One frozen ``Config`` holds every setting of a run: where it lives, the data,
the network (``Config.unet`` is the ``diffusion.unet.UNetConfig`` it describes),
the objective, the optimisation and what the run writes. ``make_config(preset,
**overrides)`` starts from a preset; every field is also a flag of ``train.py``.
Every value is checked on construction, so a bad setting raises a
``ConfigError`` that names it before anything is loaded or compiled.

A run saves its ``Config`` with every checkpoint (``config.json``, via
``to_dict``), under the key ``"kind"`` the kind of model it holds;
``diffusion.runs`` reads it back. ``check_compatible`` says whether a saved
run can be resumed with a given config: only the fields that decide what the
network computes (``ARCHITECTURE_FIELDS``) must agree.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from pathlib import Path
from typing import ClassVar

from diffusion import concepts, data, distillation, lora, tokenizer
from diffusion.autoencoder import RECONSTRUCTION_LOSSES, AutoencoderConfig
from diffusion.errors import ConfigError, InputError, check_whole
from diffusion.schedules import BETA_SCHEDULES, Schedule, timesteps
from diffusion.text_encoder import TextEncoderConfig
from diffusion.unet import UNET_FIELDS, UNetConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings every kind of training run has: its folder, its data, the optimisation and what it writes.

    Each kind of run adds its model's fields: ``Config`` (a denoising U-Net),
    ``TextConfig``, ``AutoencoderRunConfig``, ``LatentConfig``, ``LatentTextConfig``, ``DistillConfig``,
    ``LoRAConfig``.
    """

    kind: ClassVar[str] = ""  # what the run's checkpoints hold (see diffusion.runs)
    # Fields train.py does not offer as flags (derived, or pinned when the run starts: diffusion.runs.start_config)
    NOT_FLAGS: ClassVar[tuple[str, ...]] = ("class_names", "dataset_sha256")

    # Run
    name: str = "default"  # the run folder is <runs_dir>/<name>
    runs_dir: str = "runs"
    seed: int = 0
    resume: bool = False  # continue from the run folder's last checkpoint
    # Data
    dataset: str = "mnist-embedded"  # see diffusion.data.DATASET_NAMES, or folder:PATH (diffusion.folders)
    image_size: int = 28
    in_channels: int = 1
    crop: str = "center"  # a folder's images: the centre square, or (random) a random window at every step
    flip: bool = False  # mirror each training image left-right with probability 1/2
    class_names: tuple[str, ...] = ()  # pinned for a folder: its class folders' names, label 0 first
    dataset_sha256: str = ""  # pinned for a folder: its fingerprint (diffusion.folders), so a changed one is noticed
    # Optimisation
    batch_size: int = 64
    steps: int = 1800
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # maximum global gradient norm
    ema_decay: float = 0.995  # an average over the last ~1 / (1 - decay) = 200 steps
    compute_dtype: str = "float32"  # bfloat16: faster matmuls and convolutions on accelerators
    devices: int = 0  # how many local devices to use; 0 = all
    distributed: bool = False  # one of several processes (one per host) of one run: jax.distributed.initialize()
    # With distributed, where the processes meet and which one this is (all three, or none: JAX reads them from
    # the cluster, SLURM or Open MPI); given at every launch, never taken from a checkpoint (LAUNCH_FIELDS).
    coordinator: str = ""  # HOST:PORT of process 0, which listens there; every process names the same
    num_processes: int = 0
    process_id: int = 0  # 0 .. num_processes - 1; process 0 writes the run folder
    # Output
    log_every: int = 50
    checkpoint_every: int = 400
    keep_checkpoints: int = 3
    sample_every: int = 400  # a grid of samples from the EMA model every this many steps (and at the end); 0 = never

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        _validate_run(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        """The name of each class label: a folder's class folders, or a named dataset's classes
        (``data.CLASS_NAMES``)."""
        return self.class_names or data.CLASS_NAMES.get(self.dataset, ())

    def to_dict(self) -> dict:
        """The settings as saved in ``config.json``: the kind, then every field."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Config(RunConfig):
    """A denoising U-Net's training run; each field is also a flag of ``train.py`` (``--learning-rate 1e-3``).

    The defaults are the ``cpu`` preset: class-conditional digits from the
    embedded MNIST on a laptop CPU. Invalid values raise a ConfigError on
    construction.
    """

    kind: ClassVar[str] = "denoiser"

    num_classes: int = 10  # 0 trains an unconditional model
    # Network (diffusion.unet.UNetConfig)
    channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    # Objective (diffusion.losses)
    parameterization: str = "v"  # eps, x0, v (on the schedule) or velocity (flow matching)
    schedule: str = "cosine"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma weighting (Hang et al. 2023; 5 is usual); 0 = off
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    label_dropout: float = 0.1
    # Sample grids
    sample_steps: int = 25  # DDIM (trailing spacing) or flow Euler steps for the grid
    sample_guidance: float = 3.0  # classifier-free guidance scale for the grid; 1 = none

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):  # lists from JSON or code become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()
        _validate(self)

    @property
    def unet(self) -> UNetConfig:
        """The network this run trains."""
        return UNetConfig(**{name: getattr(self, name) for name in UNET_FIELDS})

    @property
    def noise_schedule(self) -> Schedule:
        """The schedule of the forward process this run trains on (unused by flow models)."""
        return Schedule(self.schedule, self.num_timesteps, zero_terminal_snr=self.zero_terminal_snr)


@dataclasses.dataclass(frozen=True)
class TextConfig(Config):
    """A text-conditioned run: the fields of ``Config``, and a text encoder read through cross-attention.

    The digits are captioned afresh each time they are seen (``diffusion.captions``),
    tokenized with ``vocabulary`` (``diffusion.tokenizer``), and a caption is
    replaced by the empty prompt with probability ``prompt_dropout``. The U-Net
    has no class labels (``num_classes`` = 0).
    """

    kind: ClassVar[str] = "text"
    # (the tokenizer's words, which the captions' grammar decides, are not a flag)
    NOT_FLAGS: ClassVar[tuple[str, ...]] = RunConfig.NOT_FLAGS + ("vocabulary",)

    num_classes: int = 0
    text_width: int = 32  # the encoder's width, and the tokens' width that cross-attention reads
    text_layers: int = 2
    text_heads: int = 2
    max_tokens: int = tokenizer.MAX_TOKENS
    vocabulary: tuple[str, ...] = tokenizer.caption_tokenizer().vocabulary
    prompt_dropout: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        super().__post_init__()
        if self.num_classes:
            raise ConfigError("a text model is steered by prompts, not labels: leave num_classes at 0")
        if self.dataset not in data.DIGIT_DATASETS:
            raise ConfigError(
                f"a text run captions handwritten digits: use dataset {' or '.join(data.DIGIT_DATASETS)} "
                f"(got {self.dataset})"
            )
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"prompt_dropout must be in [0, 1) (got {self.prompt_dropout}); 0.1 is usual")
        if self.vocabulary[:2] != (tokenizer.PAD, tokenizer.EMPTY):
            raise ConfigError(f"the vocabulary starts with {tokenizer.PAD} and {tokenizer.EMPTY}")
        self.text_encoder  # the encoder's own checks (a ConfigError)

    @property
    def unet(self) -> UNetConfig:
        return dataclasses.replace(super().unet, context_dim=self.text_width)

    @property
    def text_encoder(self) -> TextEncoderConfig:
        """The text encoder this run trains."""
        return TextEncoderConfig(
            len(self.vocabulary), self.max_tokens, self.text_width, self.text_layers, self.text_heads,
            self.compute_dtype,
        )

    @property
    def tokenizer(self) -> tokenizer.Tokenizer:
        """The tokenizer of this run's vocabulary."""
        return tokenizer.Tokenizer(self.vocabulary, self.max_tokens)


# The AutoencoderConfig fields, each of which an autoencoder run has a field of that name for.
AUTOENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderConfig))


@dataclasses.dataclass(frozen=True)
class AutoencoderRunConfig(RunConfig):
    """An autoencoder's training run (``diffusion.autoencoder``): the fields of ``RunConfig`` and the network's.

    Its checkpoints also record the scale factor of its latents
    (``latent_scale`` in meta.json), which a latent run pins.
    """

    kind: ClassVar[str] = "autoencoder"
    num_classes: ClassVar[int] = 0  # it is not conditioned

    latent_channels: int = 4
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # 3 levels: the latent's side is the image's / 4
    num_res_blocks: int = 1
    norm_groups: int = 8
    kl_weight: float = 1e-6  # of the KL term against the reconstruction term, both summed over an image (as LDM's)
    reconstruction: str = "l2"  # l1 or l2 (diffusion.autoencoder.RECONSTRUCTION_LOSSES); l2 measured better here

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        super().__post_init__()
        self.autoencoder  # the network's own checks (a ConfigError)
        _need(self.kl_weight >= 0, f"kl_weight must be >= 0 (got {self.kl_weight}); 1e-6 is LDM's")
        _need(
            self.reconstruction in RECONSTRUCTION_LOSSES,
            f"reconstruction must be one of {', '.join(RECONSTRUCTION_LOSSES)} (got {self.reconstruction!r})",
        )

    @property
    def autoencoder(self) -> AutoencoderConfig:
        """The network this run trains."""
        return AutoencoderConfig(**{name: getattr(self, name) for name in AUTOENCODER_FIELDS})


@dataclasses.dataclass(frozen=True)
class LatentConfig(Config):
    """A denoiser trained in the latent space of an autoencoder run (``diffusion.latent``).

    ``image_size`` and ``in_channels`` remain those of the images; the U-Net
    runs on the latent grid, ``latent_shape``. The autoencoder is pinned when
    the run starts (``diffusion.runs.start_config``): the sha256 of its
    weights, its latent shape and its scale factor are copied into this
    config, so that a changed autoencoder is noticed, not silently used.
    """

    kind: ClassVar[str] = "latent"
    NOT_FLAGS: ClassVar[tuple[str, ...]] = RunConfig.NOT_FLAGS + (
        "autoencoder_sha256", "latent_scale", "latent_shape")

    autoencoder: str = "runs/autoencoder"  # the autoencoder's run folder (or one of its checkpoint folders)
    autoencoder_sha256: str = ""  # pinned: the sha256 of its weights
    latent_scale: float = 0.0  # pinned: multiplies the latents before diffusion (1 / their standard deviation)
    latent_shape: tuple[int, ...] = ()  # pinned: (h, w, c) of an image's latent

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(self.latent_shape))
        _need(
            bool(self.autoencoder_sha256) and self.latent_scale > 0 and len(self.latent_shape) == 3,
            "a latent run needs its autoencoder pinned: start it with train.py --preset latent --autoencoder RUN "
            "(diffusion.runs.start_config)",
        )
        super().__post_init__()
        _need(self.crop == "center" and not self.flip,
              "a latent run encodes its images once, before training: it cannot crop or flip them at every step")

    @property
    def unet(self) -> UNetConfig:
        """The network this run trains: on latents of shape ``latent_shape``."""
        h, _, c = self.latent_shape
        return UNetConfig(**{**{name: getattr(self, name) for name in UNET_FIELDS}, "image_size": h, "in_channels": c})


@dataclasses.dataclass(frozen=True)
class LatentTextConfig(TextConfig, LatentConfig):
    """Text prompts in latent space: a ``TextConfig`` run whose U-Net denoises the latents of a pinned autoencoder,
    as a ``LatentConfig`` run does; both classes' fields and checks apply, and it is an instance of both.

    This is the arrangement of Stable Diffusion (Rombach et al. 2022, Sec. 3.3):
    the captions' tokens are read by cross-attention on the latent grid, and the
    images are decoded once, after the last step.
    """

    kind: ClassVar[str] = "latent-text"
    NOT_FLAGS: ClassVar[tuple[str, ...]] = tuple(dict.fromkeys(TextConfig.NOT_FLAGS + LatentConfig.NOT_FLAGS))


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """A few-step student distilled from a trained teacher run (``diffusion.distillation``).

    ``method`` is ``progressive`` (Salimans & Ho 2022: the student does in one
    DDIM step what the teacher did in two, ``teacher_steps`` -> half as many) or
    ``consistency`` (Song et al. 2023; LCM, Luo et al. 2023: the student maps any
    point of the teacher's ODE trajectory to its origin, sampled with ``lcm``).
    The student has its teacher's architecture, a guidance embedding besides,
    and starts from its weights; the teacher is guided at a scale drawn from
    [``guidance_min``, ``guidance_max``] for each example, which the student
    takes as an input. The teacher is pinned when the run starts
    (``diffusion.runs.start_config``): its architecture fields are copied from
    its config, and the sha256 of its weights and its method (empty for an
    ordinary denoiser, ``progressive`` for a student of an earlier stage) are
    recorded.
    """

    kind: ClassVar[str] = "distill"
    NOT_FLAGS: ClassVar[tuple[str, ...]] = RunConfig.NOT_FLAGS + ("teacher_sha256", "teacher_method")

    method: str = "progressive"  # progressive or consistency
    teacher: str = "runs/default"  # the teacher's run folder (or one of its checkpoint folders)
    teacher_sha256: str = ""  # pinned: the sha256 of its weights
    teacher_method: str = ""  # pinned: "" for an ordinary denoiser, else the method of the teacher's own run
    teacher_steps: int = 64  # progressive: the teacher's DDIM steps (trailing); the student learns half as many
    origin_steps: int = 50  # consistency: LCM's grid of the teacher's steps (skipping step T // origin_steps)
    # The scales the teacher is guided at, one drawn per example; the student takes it as an input. One fixed
    # scale by default: in a few CPU minutes a student learns one guided map, not a family of them (a range of
    # [1, 4] left the loss 17x higher and FID 41 where 1.5 alone gives 21; docs/distillation.md).
    guidance_min: float = 1.5
    guidance_max: float = 1.5
    sample_guidance: float = 1.5
    consistency_loss: str = "huber"  # huber (pseudo-Huber, c = huber_c) or l2
    huber_c: float = 0.001

    def __post_init__(self):
        _need(
            bool(self.teacher_sha256),
            "a distillation run needs its teacher pinned: start it with train.py --preset progressive|consistency "
            "--teacher RUN (diffusion.runs.start_config)",
        )
        super().__post_init__()
        _need(self.method in distillation.METHODS,
              f"unknown method {self.method!r}; choose one of {', '.join(distillation.METHODS)}")
        _need(self.num_classes > 0 and self.parameterization != "velocity",
              "distillation here needs a class-conditional teacher on a noise schedule (eps, x0 or v), not a flow")
        _need(1.0 <= self.guidance_min <= self.guidance_max,
              f"the guidance range must have 1 <= guidance_min <= guidance_max (got {self.guidance_min}, "
              f"{self.guidance_max})")
        _need(self.guidance_min <= self.sample_guidance <= self.guidance_max,
              f"sample_guidance ({self.sample_guidance}) must lie in the distilled range [{self.guidance_min}, "
              f"{self.guidance_max}]")
        if self.method == "progressive":
            check_whole("teacher_steps", self.teacher_steps, 2, ConfigError)
            _need(self.teacher_steps % 2 == 0 and self.teacher_steps <= self.num_timesteps,
                  f"teacher_steps must be even and at most num_timesteps (got {self.teacher_steps})")
            trailing = (timesteps(self.noise_schedule, n, "trailing") for n in (self.teacher_steps, self.student_steps))
            _need(np.array_equal(next(trailing)[::2], next(trailing)),
                  f"with teacher_steps {self.teacher_steps} the student's trailing grid is not every other timestep "
                  "of the teacher's: choose a power of two, or another number of steps whose grids nest")
            _need(self.sample_steps == self.student_steps,
                  f"a progressive student samples in teacher_steps / 2 = {self.student_steps} steps: set "
                  f"sample_steps to {self.student_steps}")
        else:
            check_whole("origin_steps", self.origin_steps, 1, ConfigError)
            _need(self.origin_steps <= self.num_timesteps,
                  f"origin_steps must be at most num_timesteps (got {self.origin_steps})")
            _need(self.sample_steps <= self.origin_steps,
                  f"the lcm sampler takes at most origin_steps ({self.origin_steps}) steps (sample_steps "
                  f"{self.sample_steps})")
            _need(self.consistency_loss in distillation.CONSISTENCY_LOSSES,
                  f"consistency_loss must be one of {', '.join(distillation.CONSISTENCY_LOSSES)} "
                  f"(got {self.consistency_loss!r})")
            _need(self.huber_c > 0, f"huber_c must be > 0 (got {self.huber_c}); 0.001 is LCM's")

    @property
    def unet(self) -> UNetConfig:
        """The teacher's network, with a guidance embedding."""
        return dataclasses.replace(super().unet, guidance_embedding=True)

    @property
    def student_steps(self) -> int:
        """The steps the student samples in: half the teacher's (progressive), or ``sample_steps`` (consistency)."""
        return self.teacher_steps // 2 if self.method == "progressive" else self.sample_steps

    @property
    def sampling(self) -> dict:
        """The sampler the student was distilled for, as ``diffusion.samplers.sample``'s settings."""
        if self.method == "progressive":
            return dict(sampler="ddim", spacing="trailing")
        return dict(sampler="lcm", origin_steps=self.origin_steps)


@dataclasses.dataclass(frozen=True)
class LoRAConfig(Config):
    """Fine-tuning a trained base run on a new concept or style (``diffusion.lora``, ``diffusion.concepts``).

    ``method`` is ``lora`` (Hu et al. 2021: only a low-rank adapter of ``rank`` and ``alpha`` on the layer
    groups ``targets`` trains, and new label rows) or ``full`` (every weight trains: the comparison LoRA is
    measured against). ``concept`` is what is taught: ``letters`` (``concept_images`` renderings of each of
    ``letters``, each a new class label after the base's, ``diffusion.concepts.render_letters``) or a style of
    ``diffusion.concepts.STYLES`` (``concept_images`` training digits, drawn at random with the seed, redrawn in
    it, under their own labels). New letters train beside ``prior_images`` of the base's training digits (prior
    preservation). The base is pinned when the run starts (``diffusion.runs.start_config``): its architecture
    fields are copied from its config (``base_num_classes`` its classes; ``num_classes`` counts the new ones
    too) and the sha256 of its weights recorded.
    """

    kind: ClassVar[str] = "lora"
    NOT_FLAGS: ClassVar[tuple[str, ...]] = RunConfig.NOT_FLAGS + ("base_sha256", "base_num_classes")

    method: str = "lora"  # lora or full
    base: str = "runs/default"  # the base run folder (or one of its checkpoint folders)
    base_sha256: str = ""  # pinned: the sha256 of its weights
    base_num_classes: int = 0  # pinned: the base's classes (new ones are numbered after them)
    # Rank 4 on the default layers: 7.8 % of the default base's numbers. The letter A came out as asked in 89 % of
    # draws (rank 1: 67 %, or 92 % with --learning-rate 1e-2; rank 16: 94 %; every weight fine-tuned: 98 %);
    # hollow digits in 81 % (docs/lora.md).
    rank: int = 4
    alpha: float = 4.0  # alpha / rank = 1
    targets: tuple[str, ...] = lora.AdapterConfig.targets
    concept: str = "letters"  # letters, or a style of diffusion.concepts.STYLES
    letters: str = "A"  # concept letters: one new class label each
    concept_images: int = 100  # renderings per letter, or digits drawn in the style
    # Prior preservation (DreamBooth, Ruiz et al. 2023, Sec. 3.3): this many of the base's own training digits
    # train beside the letters, under their labels, so that the adapter learns to draw the new class without
    # redrawing the old ones (without them every label drifts towards the letter).
    prior_images: int = 900

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        _need(
            bool(self.base_sha256),
            "an adapter run needs its base pinned: start it with train.py --preset lora --base RUN "
            "(diffusion.runs.start_config)",
        )
        super().__post_init__()
        _need(self.method in LORA_METHODS, f"unknown method {self.method!r}; choose one of {', '.join(LORA_METHODS)}")
        _need(self.concept == "letters" or self.concept in concepts.STYLES,
              f"unknown concept {self.concept!r}; choose letters or a style: {', '.join(concepts.STYLES)}")
        check_whole("concept_images", self.concept_images, 1, ConfigError)
        check_whole("prior_images", self.prior_images, 0, ConfigError)
        _need(self.concept == "letters" or not self.prior_images,
              "a style redraws the base's digits under their own labels: set prior_images to 0")
        _need(self.base_num_classes > 0, "the base of an adapter run must be a class-conditional model")
        new = len(self.letters) if self.concept == "letters" else 0
        _need(self.num_classes == self.base_num_classes + new,
              f"num_classes is the base's {self.base_num_classes} and the {new} new ones: leave the flag out")
        if self.concept == "letters":
            try:
                concepts.check_letters(self.letters)
            except InputError as error:
                raise ConfigError(str(error)) from None
        self.adapter  # the adapter's own checks (a ConfigError)

    @property
    def unet(self) -> UNetConfig:
        """The base's network (with its own classes; the adapter adds the new ones)."""
        return dataclasses.replace(super().unet, num_classes=self.base_num_classes)

    @property
    def adapter(self) -> lora.AdapterConfig:
        """The adapter this run trains (for a full fine-tune only its new classes count)."""
        return lora.AdapterConfig(self.rank, self.alpha, self.targets, self.num_classes - self.base_num_classes)


LORA_METHODS = ("lora", "full")


# The settings that decide what the network computes: a checkpoint can only be
# resumed with the same values.
ARCHITECTURE_FIELDS = tuple(f for f in UNET_FIELDS if f not in ("dropout", "compute_dtype")) + (
    "schedule",
    "num_timesteps",
    "zero_terminal_snr",
)
# How one process of a run is launched, not what the run is: a resumed run takes them from its own command line
# (each host its own process_id), never from the config.json of the checkpoint (written by process 0).
LAUNCH_FIELDS = ("coordinator", "num_processes", "process_id")
# The architecture fields of each kind of run: a checkpoint of that kind resumes only with the same values.
_TEXT_FIELDS = ("text_width", "text_layers", "text_heads", "max_tokens", "vocabulary")
_LATENT_FIELDS = ("autoencoder_sha256", "latent_scale", "latent_shape")
KIND_ARCHITECTURE_FIELDS = {
    "denoiser": ARCHITECTURE_FIELDS,
    "text": ARCHITECTURE_FIELDS + _TEXT_FIELDS,
    "latent": ARCHITECTURE_FIELDS + _LATENT_FIELDS,
    "latent-text": ARCHITECTURE_FIELDS + _TEXT_FIELDS + _LATENT_FIELDS,
    "autoencoder": tuple(f for f in AUTOENCODER_FIELDS if f != "compute_dtype"),
    "distill": ARCHITECTURE_FIELDS + ("method", "teacher_sha256", "teacher_steps", "origin_steps"),
    "lora": ARCHITECTURE_FIELDS + ("method", "base_sha256", "rank", "alpha", "targets", "concept", "letters"),
}

# For tests and a first look: seconds on a CPU, nothing learned.
_RUN_TINY = dict(batch_size=16, steps=20, warmup_steps=5, log_every=5, checkpoint_every=10, sample_every=20)
_TINY = dict(
    _RUN_TINY,
    channels=8,
    channel_mult=(1, 2),
    attention_resolutions=(14,),
    norm_groups=4,
    sample_steps=2,
)

# A larger model for a GPU, on the full MNIST (or --dataset fashion-mnist); 28 is padded to 32.
_GPU = dict(
    dataset="mnist",
    channels=64,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    num_heads=4,
    norm_groups=32,
    dropout=0.1,
    min_snr_gamma=5.0,
    batch_size=256,
    steps=30_000,
    learning_rate=5e-4,
    warmup_steps=1000,
    ema_decay=0.9995,
    log_every=100,
    checkpoint_every=2000,
)

# Fine-tuning a base for a few CPU minutes (LoRAConfig): its adapter's settings.
_LORA = dict(steps=400, batch_size=32, learning_rate=3e-3, warmup_steps=20, ema_decay=0.99, checkpoint_every=200,
             sample_every=200)

PRESETS = {
    "tiny": _TINY,
    # The default: the Config defaults above.
    "cpu": dict(),
    # Text prompts (TextConfig): digits captioned by their thickness, slant and size, on a laptop CPU:
    # 3,600 steps, 13.6 minutes on 2 cores (docs/prompts.md).
    "text": dict(steps=3600),
    # For tests: a text model of seconds.
    "text-tiny": dict(_TINY, text_width=8, text_layers=1),
    # A larger model for a GPU, on the full MNIST (or --dataset fashion-mnist); 28 is padded to 32.
    "gpu": _GPU,
    # Text prompts on a GPU: the gpu U-Net with a 4-layer text encoder of width 128, on the full MNIST.
    "text-gpu": dict(_GPU, text_width=128, text_layers=4, text_heads=4),
    # The autoencoder of latent diffusion (AutoencoderRunConfig): 28×28×1 digits to 7×7×4 latents.
    "autoencoder": dict(
        name="autoencoder", channels=16, channel_mult=(1, 2, 4), steps=600, warmup_steps=50, checkpoint_every=200,
        sample_every=200,
    ),
    "autoencoder-tiny": dict(_RUN_TINY, channels=8, channel_mult=(1, 2, 2), norm_groups=4),
    # Latent diffusion (LatentConfig): the U-Net on the 7×7×4 latents of --autoencoder (8×8 padded, then 4×4).
    "latent": dict(name="latent", channels=32, channel_mult=(1, 2), attention_resolutions=(4,), steps=4000),
    "latent-tiny": dict(_TINY, channel_mult=(1, 2), attention_resolutions=(4,)),
    # Text prompts in latent space (LatentTextConfig): the latent U-Net with the text preset's encoder.
    "latent-text": dict(name="latent-text", channels=32, channel_mult=(1, 2), attention_resolutions=(4,), steps=9000),
    "latent-text-tiny": dict(_TINY, channel_mult=(1, 2), attention_resolutions=(4,), text_width=8, text_layers=1),
    # Few-step students of --teacher (DistillConfig; the architecture is the teacher's). Progressive
    # distillation halves the teacher's DDIM steps per run: 64 -> 32 here, then --teacher runs/progressive-32 ...
    "progressive": dict(method="progressive", teacher_steps=64, sample_steps=32, steps=400, learning_rate=3e-4,
                        warmup_steps=20, ema_decay=0.99, checkpoint_every=200, sample_every=200),
    "progressive-tiny": dict(_RUN_TINY, method="progressive", teacher_steps=4, sample_steps=2),
    # Consistency distillation (LCM): the EMA of the weights is the target network (decay 0.95, as LCM's).
    "consistency": dict(method="consistency", sample_steps=4, steps=1000, learning_rate=3e-4, warmup_steps=20,
                        ema_decay=0.95, checkpoint_every=200, sample_every=200),
    "consistency-tiny": dict(_RUN_TINY, method="consistency", sample_steps=2, ema_decay=0.95),
    # LoRA fine-tuning of --base (LoRAConfig; the architecture is the base's): a new letter as a new label, or
    # a style of the digits; --method full trains every weight instead.
    "lora": dict(name="lora-A", concept="letters", letters="A", **_LORA),
    "lora-style": dict(name="lora-hollow", concept="hollow", prior_images=0, **_LORA),
    "lora-tiny": dict(_RUN_TINY, name="lora-tiny", concept="letters", letters="A", concept_images=20,
                      prior_images=20),
}


def _need(ok, message):
    if not ok:
        raise ConfigError(message)


CROPS = ("center", "random")


def _validate_run(c: RunConfig):
    """Raise a ConfigError naming the setting to change, before anything is loaded or compiled."""
    for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        check_whole(name, getattr(c, name), 1, ConfigError)
    for name in ("seed", "warmup_steps", "devices", "sample_every"):
        check_whole(name, getattr(c, name), 0, ConfigError)
    _need(
        bool(c.name) and "/" not in c.name and c.name not in (".", ".."),
        f"name must be a plain folder name (got {c.name!r})",
    )
    _need(
        c.dataset in data.DATASET_NAMES or (data.is_folder(c.dataset) and len(c.dataset) > len(data.FOLDER)),
        f"unknown dataset {c.dataset!r}; choose one of {', '.join(data.DATASET_NAMES)}, or folder:PATH for a "
        "folder of your own images",
    )
    _need(c.crop in CROPS, f"crop must be one of {', '.join(CROPS)} (got {c.crop!r})")
    if data.is_folder(c.dataset):
        _need(c.in_channels in (1, 3), f"a folder's images are read as grey (in_channels 1) or RGB (3), not "
                                       f"{c.in_channels} channels")
        _need(bool(c.dataset_sha256), "a run on a folder needs it pinned: start it with train.py --dataset "
                                      "folder:PATH (diffusion.runs.start_config)")
    else:
        _need(c.crop == "center", "crop random needs a folder of images (--dataset folder:PATH), which are "
                                  "prepared larger than image_size; a named dataset has its images' size already")
    _need(
        c.learning_rate > 0 and math.isfinite(c.learning_rate),
        f"learning_rate must be a positive number (got {c.learning_rate})",
    )
    _need(c.warmup_steps < c.steps, f"warmup_steps ({c.warmup_steps}) must be fewer than steps ({c.steps})")
    _need(c.weight_decay >= 0, f"weight_decay must be >= 0 (got {c.weight_decay})")
    _need(c.grad_clip > 0, f"grad_clip must be > 0 (got {c.grad_clip}); use inf for no clipping")
    _need(0.0 <= c.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {c.ema_decay}); 0.999 is usual")
    _need(
        not (c.distributed and c.devices),
        "with distributed=True every device of every host is used; leave devices at 0",
    )
    _validate_launch(c)


def _validate_launch(c: RunConfig):
    """The checks of ``LAUNCH_FIELDS``: none of them, or with ``distributed`` all of them (the id in range)."""
    check_whole("num_processes", c.num_processes, 0, ConfigError)
    check_whole("process_id", c.process_id, 0, ConfigError)
    given = [name for name in LAUNCH_FIELDS if getattr(c, name)]
    _need(c.distributed or not given, f"{given[0] if given else ''} is for the processes of a distributed run: "
                                      "add --distributed, or leave it out")
    _need(
        bool(c.coordinator) == bool(c.num_processes) and (c.coordinator or not c.process_id),
        "give every process of a distributed run --coordinator HOST:PORT, --num-processes N and its --process-id I "
        "(0 where the coordinator listens), or none of them on a cluster that JAX reads them from (SLURM, Open MPI)",
    )
    host, _, port = c.coordinator.rpartition(":")
    _need(
        not c.coordinator or (bool(host) and port.isdigit() and 0 < int(port) < 65536),
        f"coordinator must be HOST:PORT, the address of process 0's host and a free port there (got {c.coordinator!r})",
    )
    _need(
        c.process_id < max(c.num_processes, 1),
        f"process_id must be less than num_processes ({c.num_processes}): one of 0 .. {c.num_processes - 1}, each "
        f"process its own (got {c.process_id})",
    )


def _validate(c: Config):
    """The checks of a denoiser's own fields (after ``_validate_run``'s)."""
    _need(
        not c.class_names or c.kind not in ("denoiser", "latent") or c.num_classes in (0, len(c.class_names)),
        f"the folder has {len(c.class_names)} classes ({', '.join(c.class_names)}): num_classes must be that, or 0 "
        f"to train without classes (got {c.num_classes})",
    )
    check_whole("num_timesteps", c.num_timesteps, 1, ConfigError)
    check_whole("sample_steps", c.sample_steps, 1, ConfigError)
    c.unet  # the network's own checks (a ConfigError)
    _need(c.schedule in BETA_SCHEDULES, f"unknown schedule {c.schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    _need(
        not (c.zero_terminal_snr and c.parameterization == "eps"),
        "zero_terminal_snr needs parameterization v or x0: at zero SNR an eps prediction says nothing about x0 "
        "(Lin et al. 2023, Sec. 3.2)",
    )
    _need(
        c.min_snr_gamma >= 0,
        f"min_snr_gamma must be >= 0 (got {c.min_snr_gamma}); 0 turns the weighting off, 5 is usual",
    )
    _need(
        not (c.min_snr_gamma and c.parameterization == "velocity"),
        "min_snr_gamma applies to eps, x0 and v on a schedule, not to flow matching; set --min-snr-gamma 0",
    )
    _need(c.flow_logit_std > 0, f"flow_logit_std must be > 0 (got {c.flow_logit_std})")
    _need(0.0 <= c.label_dropout < 1.0, f"label_dropout must be in [0, 1) (got {c.label_dropout}); 0.1 is usual")
    _need(
        c.sample_steps <= c.num_timesteps,
        f"sample_steps ({c.sample_steps}) must be at most num_timesteps ({c.num_timesteps})",
    )
    _need(c.sample_guidance >= 1.0, f"sample_guidance must be >= 1 (got {c.sample_guidance}); 1 means no guidance")


def config_class(preset: str) -> type[RunConfig]:
    """The class of a preset's config, from its name: ``LatentTextConfig`` for latent-text*, ``TextConfig`` for
    text*, ``AutoencoderRunConfig`` for autoencoder*, ``LatentConfig`` for latent*, ``DistillConfig`` for
    progressive* and consistency*, ``LoRAConfig`` for lora*, ``Config`` for the others."""
    for prefix, cls in (
        ("latent-text", LatentTextConfig), ("text", TextConfig), ("autoencoder", AutoencoderRunConfig),
        ("latent", LatentConfig), ("progressive", DistillConfig), ("consistency", DistillConfig), ("lora", LoRAConfig),
    ):
        if preset.startswith(prefix):
            return cls
    return Config


def make_config(preset: str = "cpu", **overrides) -> Config:
    """The named preset (one of ``PRESETS``) with ``overrides`` applied.

    A latent run also needs its autoencoder pinned: start one with
    ``diffusion.runs.start_config``. With ``resume=True`` use
    ``diffusion.runs.resume_config`` instead, which starts from the
    configuration saved in the run's last checkpoint.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cls = config_class(preset)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)} for preset {preset}")
    return cls(**{**PRESETS[preset], **overrides})


def config_from_dict(values: dict, cls: type[Config] = Config) -> Config:
    """A ``cls`` from a saved ``config.json`` (fields it lacks take their defaults; the kind and unknown keys are
    ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def check_compatible(saved: Config, config: Config, where) -> None:
    """Raise a ConfigError naming the first architecture field in which a saved config differs from ``config``."""
    if saved.kind != config.kind:
        raise ConfigError(f"checkpoint {where} holds a {saved.kind} model, but the config is of a {config.kind} model")
    for field in KIND_ARCHITECTURE_FIELDS[config.kind]:
        if getattr(saved, field) != getattr(config, field):
            raise ConfigError(
                f"checkpoint {where} was trained with {field}={getattr(saved, field)!r}, "
                f"but the config asks for {field}={getattr(config, field)!r}; use the checkpoint's value "
                f"(or leave the flag out when resuming), or start a new run with another --name"
            )
