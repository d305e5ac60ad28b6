"""Where a run lives: its folder, its checkpoints, the kind of model they hold, and loading it in one call.

A run folder ``<runs_dir>/<name>/`` (the layout is spelled here and nowhere else):

    checkpoints/step_XXXXXXXX/   one checkpoint per saved step (``diffusion.checkpoint``):
                                 state.npz, config.json, meta.json
    metrics.jsonl, loss.png      what training logged
    samples/step_XXXXXXXX.png    grids drawn during training

What a checkpoint holds is its **kind**, the ``"kind"`` key of its
``config.json`` (checkpoints written before kinds were recorded hold no key;
they are denoisers). Each kind in ``KINDS`` says how to read its config and
rebuild its model, which other runs it depends on (``Reference``: a latent
model names its autoencoder, a distilled student its teacher, an adapter its
base, each by path and sha256), and what a sampler needs from it. The kinds:

    denoiser   a U-Net that predicts eps / x0 / v (or a flow velocity), in pixel space,
               conditioned on class labels (``num_classes`` > 0) or on nothing
    text       a text encoder and a U-Net that reads it through cross-attention
               (``diffusion.text_encoder.TextUNet``), conditioned on prompts; its
               config (``TextConfig``) holds the tokenizer's vocabulary
    autoencoder  images to latents and back (``diffusion.autoencoder``); its
               checkpoints' meta.json records the latents' scale factor
    latent     a denoiser like the first, on the latents of an autoencoder run
               that its config (``LatentConfig``) pins by path and sha256
    distill    a few-step student of a denoiser run, its teacher, which its config
               (``DistillConfig``) pins by path and sha256: the teacher's U-Net with
               a guidance embedding, sampled with DDIM (progressive) or lcm (consistency)
    lora       an adapter of a label denoiser run, its base, which its config
               (``LoRAConfig``) pins by path and sha256: low-rank updates and new class
               labels (``diffusion.lora``), or every weight for a full fine-tune; each
               checkpoint also holds ``adapter.safetensors``, what sampling reads
               (``open_adapter``, ``attach``)

``start_config(preset, **overrides)`` is the config of a new run, with the
runs it depends on pinned; ``resume_config`` the saved config of a run to
continue. ``open_checkpoint(path)`` resolves a run or checkpoint folder once,
reads its config and hashes its weights; ``load(checkpoint)`` returns a
generative model with its denoiser, parameterization and conditioning, and
``load_latent_space(config, run_dir)`` a latent run's autoencoder, ``load_teacher`` a
student's teacher. Every problem is a
``CheckpointError`` that says what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from diffusion import checkpoint, configs, data, folders, latent, lora
from diffusion.autoencoder import Autoencoder
from diffusion.files import sha256_of
from diffusion.configs import (
    AutoencoderRunConfig, Config, DistillConfig, LatentConfig, LatentTextConfig, LoRAConfig, TextConfig,
    config_from_dict,
)
from diffusion.errors import CheckpointError, ConfigError
from diffusion.text_encoder import TextUNet
from diffusion.unet import UNet, as_denoiser

DEFAULT_RUN = "runs/default"  # what make demo trains and sample.py / evaluate.py read by default


def checkpoint_dir(run_dir) -> Path:
    """The folder of a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def samples_path(run_dir, step: int) -> Path:
    """The grid drawn at ``step`` during training."""
    return Path(run_dir) / "samples" / f"{checkpoint.step_name(step)}.png"


# --- Kinds of model -------------------------------------------------------------------


class Reference(NamedTuple):
    """Another run that a run depends on (its role, e.g. "autoencoder"), pinned by the sha256 of its weights.

    A run pins absolute paths (``start_config``); a relative one (written by
    hand, say after moving the runs folder) is read relative to the folder of
    the run that names it (``resolve``).
    """

    role: str
    path: str
    sha256: str


class Conditioning(NamedTuple):
    """What a model is conditioned on: ``"label"`` (classes 0 .. num_classes-1, null label num_classes),
    ``"text"`` (token ids of prompts, ``diffusion.tokenizer``) or ``"none"``."""

    kind: str
    num_classes: int = 0


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of model a run can hold.

    config_from_dict: its settings from ``config.json``; make_model: the model of
    those settings (``nnx.Rngs`` decide the initial weights); references: the
    runs it depends on; conditioning: what it is conditioned on.
    """

    config_from_dict: Callable[[dict], Any]
    make_model: Callable[[Any, nnx.Rngs], nnx.Module]
    references: Callable[[Any], tuple[Reference, ...]]
    conditioning: Callable[[Any], Conditioning]


def make_model(config, rngs: nnx.Rngs) -> nnx.Module:
    """The model that a run's ``config`` describes (of the config's kind)."""
    return KINDS[config.kind].make_model(config, rngs)


def _label_conditioning(config: Config) -> Conditioning:
    return Conditioning("label", config.num_classes) if config.num_classes else Conditioning("none")


def _autoencoder_of(config: LatentConfig) -> Reference:
    return Reference("autoencoder", config.autoencoder, config.autoencoder_sha256)


def _teacher_of(config: DistillConfig) -> Reference:
    return Reference("teacher", config.teacher, config.teacher_sha256)


def _base_of(config: LoRAConfig) -> Reference:
    return Reference("base", config.base, config.base_sha256)


def adapt(model: UNet, config: LoRAConfig, rngs: nnx.Rngs) -> list:
    """Give the base's ``model`` the adapter of the run ``config`` (method lora; returns its wrappers) or, for a
    full fine-tune, only its new classes; in place."""
    if config.method == "lora":
        return lora.add_adapter(model, config.adapter, rngs)
    lora.add_classes(model, config.adapter.new_classes, rngs)
    return []


def _text_model(config: TextConfig, rngs: nnx.Rngs) -> TextUNet:
    return TextUNet(config.unet, config.text_encoder, config.vocabulary, rngs=rngs)


def _adapted_model(config: LoRAConfig, rngs: nnx.Rngs) -> UNet:
    model = UNet(config.unet, rngs=rngs)
    adapt(model, config, rngs)
    return model


KINDS = {
    "denoiser": Kind(
        config_from_dict=config_from_dict,
        make_model=lambda config, rngs: UNet(config.unet, rngs=rngs),
        references=lambda config: (),  # pixel-space, trained from scratch: it depends on no other run
        conditioning=_label_conditioning,
    ),
    "text": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=TextConfig),
        make_model=_text_model,
        references=lambda config: (),
        conditioning=lambda config: Conditioning("text"),
    ),
    "autoencoder": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=AutoencoderRunConfig),
        make_model=lambda config, rngs: Autoencoder(config.autoencoder, rngs=rngs),
        references=lambda config: (),
        conditioning=lambda config: None,  # it does not generate
    ),
    "latent": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=LatentConfig),
        make_model=lambda config, rngs: UNet(config.unet, rngs=rngs),
        references=lambda config: (_autoencoder_of(config),),
        conditioning=_label_conditioning,
    ),
    "latent-text": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=LatentTextConfig),
        make_model=_text_model,  # on the latent grid: config.unet is the latent one
        references=lambda config: (_autoencoder_of(config),),
        conditioning=lambda config: Conditioning("text"),
    ),
    "distill": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=DistillConfig),
        make_model=lambda config, rngs: UNet(config.unet, rngs=rngs),
        references=lambda config: (_teacher_of(config),),
        conditioning=_label_conditioning,
    ),
    "lora": Kind(
        config_from_dict=functools.partial(config_from_dict, cls=LoRAConfig),
        make_model=_adapted_model,
        references=lambda config: (_base_of(config),),
        conditioning=_label_conditioning,  # sampled on its base (sample.py --lora), with the new classes
    ),
}
TRAINABLE = ("denoiser", "text", "autoencoder", "latent", "latent-text", "distill", "lora")  # what train.py trains
GENERATIVE = ("denoiser", "text", "latent", "latent-text", "distill")  # the kinds that sample.py, evaluate.py draw


# --- Checkpoints ----------------------------------------------------------------------


class Checkpoint(NamedTuple):
    """A resolved checkpoint folder: its kind, the configuration it was trained with, the sha256 of its weights."""

    path: Path
    kind: str
    config: Any
    sha256: str

    @property
    def run_name(self) -> str:
        """The run folder's name (the checkpoint folder's own name if it lies outside a run)."""
        return self.path.parent.parent.name if self.path.parent.name == "checkpoints" else self.path.name

    @property
    def step(self) -> int | None:
        """The training step it was saved at, read from its folder name (None for another name)."""
        return checkpoint.step_of(self.path)


def find_checkpoint(path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the last checkpoint of the run folder ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: train one with train.py, or name another")
    if (path / "state.npz").exists():
        return path
    found = checkpoint.latest(checkpoint_dir(path))
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return found


def _unreadable(path, error) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({error}): use another checkpoint of the run")


def read_config(path) -> tuple[str, Any]:
    """``(kind, config)`` saved with the checkpoint folder ``path``."""
    try:
        values = checkpoint.read_json(path, "config.json")
    except (OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    kind = values.get("kind", "denoiser") if isinstance(values, dict) else None  # no key: written before kinds
    if kind not in KINDS:
        raise CheckpointError(
            f"checkpoint {path} holds a model of kind {kind!r}, which this code does not know "
            f"(it knows {', '.join(KINDS)}): was it written by a newer version?"
        )
    try:
        return kind, KINDS[kind].config_from_dict(values)
    except (ValueError, TypeError) as error:  # a ConfigError among them
        raise CheckpointError(f"checkpoint {path} has settings this code cannot use ({error})") from None


def run_folder(checkpoint_path) -> Path:
    """The run folder a checkpoint folder lies in (its own parent if it lies outside a run's checkpoints/)."""
    path = Path(checkpoint_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resolve(reference: Reference, run_dir) -> Path:
    """Where ``reference`` points, for a run in ``run_dir``: its path, taken relative to ``run_dir`` unless
    absolute."""
    return Path(os.path.normpath(Path(run_dir) / reference.path))


def check_reference(reference: Reference, run_dir, where) -> Path:
    """The checkpoint that ``reference`` (named by the run in ``run_dir``) points to; a CheckpointError unless
    it still has the weights it was pinned to."""
    try:
        found = find_checkpoint(resolve(reference, run_dir))
        actual = sha256_of(found / "state.npz")
    except (CheckpointError, OSError) as error:
        raise CheckpointError(f"{where} needs its {reference.role} {reference.path}, which cannot be read "
                              f"({error})") from None
    if actual != reference.sha256:
        raise CheckpointError(
            f"{where} was made with the {reference.role} {reference.path} of sha256 {reference.sha256[:12]}…, "
            f"but {found} now has sha256 {actual[:12]}…: restore that {reference.role}, or retrain {where}"
        )
    return found


def open_checkpoint(path) -> Checkpoint:
    """The checkpoint folder ``path``, or the last checkpoint of the run folder ``path``: resolved, its config read,
    its weights hashed, the runs it depends on checked, all once. The weights are read by ``load``."""
    found = find_checkpoint(path)
    kind, config = read_config(found)
    try:
        sha256 = sha256_of(found / "state.npz")
    except OSError as error:
        raise _unreadable(found, error) from None
    for reference in KINDS[kind].references(config):
        check_reference(reference, run_folder(found), found)
    return Checkpoint(found, kind, config, sha256)


def load_model(opened: Checkpoint, ema: bool = True) -> nnx.Module:
    """The model saved in an opened checkpoint.

    ``ema=True`` (the default) loads the moving average of the weights, the
    copy meant for sampling; ``ema=False`` the raw trained weights.
    """
    make = KINDS[opened.kind].make_model
    graphdef, template = nnx.split(nnx.eval_shape(lambda: make(opened.config, nnx.Rngs(0))))
    try:
        weights = checkpoint.load(opened.path, template, prefix="ema" if ema else "params")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {opened.path} is corrupt or incomplete ({error}): use another checkpoint of the run"
        ) from None
    return nnx.merge(graphdef, weights)


class Loaded(NamedTuple):
    """What ``load`` returns: the model and what sampling from it needs.

    denoiser ``(x, t, cond) -> prediction`` (``diffusion.unet.as_denoiser``: the
    weights are pytree leaves); parameterization, how to read the prediction;
    conditioning, what ``cond`` is.
    """

    checkpoint: Checkpoint
    model: nnx.Module
    denoiser: Callable
    parameterization: str
    conditioning: Conditioning

    @property
    def config(self):
        return self.checkpoint.config


def check_generative(opened: Checkpoint) -> None:
    """Raise a CheckpointError unless the checkpoint holds a model that generates images."""
    if opened.kind == "lora":
        raise CheckpointError(
            f"{opened.path} holds a LoRA adapter: sample from its base with it, "
            f"sample.py --checkpoint {opened.config.base} --lora {run_folder(opened.path)}"
        )
    if opened.kind not in GENERATIVE:
        raise CheckpointError(
            f"{opened.path} holds an {opened.kind}, which does not generate images: sample from a latent run "
            f"trained on it (train.py --preset latent --autoencoder {opened.path})"
        )


def load(path_or_checkpoint, ema: bool = True) -> Loaded:
    """Load a run folder, a checkpoint folder or an opened ``Checkpoint`` of a generative kind: the model with its
    denoiser, parameterization and conditioning, ready for ``diffusion.samplers``."""
    opened = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else open_checkpoint(path_or_checkpoint)
    check_generative(opened)
    model = load_model(opened, ema)
    denoiser, parameterization = as_denoiser(model)
    return Loaded(opened, model, denoiser, parameterization, KINDS[opened.kind].conditioning(opened.config))


def last_to_resume(run_dir) -> Path:
    """The last checkpoint of ``run_dir``, to resume from; a ConfigError if there is none."""
    last = checkpoint.latest(checkpoint_dir(run_dir))
    if last is None:
        raise ConfigError(f"nothing to resume: {checkpoint_dir(run_dir)} holds no checkpoint")
    return last


def resume_config(runs_dir: str = Config.runs_dir, name: str = Config.name, **overrides) -> Config:
    """The configuration saved in the last checkpoint of run ``<runs_dir>/<name>``, with ``overrides`` applied,
    and ``resume=True``: what continues that run as it was started.

    The run continues in the folder it is resumed from, even if it was renamed
    or moved since. Where its processes meet and which one this is
    (``configs.LAUNCH_FIELDS``) come from ``overrides`` alone, never from the
    checkpoint (written by process 0): a distributed run resumes on as many
    hosts as it is now given, each passing its own ``process_id``.
    """
    last = last_to_resume(Path(runs_dir) / name)
    kind, saved = read_config(last)
    if kind not in TRAINABLE:
        raise ConfigError(f"{last} holds a {kind} model, which train.py does not train: it cannot resume it")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(saved)})
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)} for a {kind} run")
    overrides.pop("resume", None)
    launch = {f.name: f.default for f in dataclasses.fields(saved) if f.name in configs.LAUNCH_FIELDS}
    return dataclasses.replace(saved, runs_dir=str(runs_dir), name=name, resume=True, **{**launch, **overrides})


# --- Latent runs ------------------------------------------------------------------------


def open_autoencoder(path) -> tuple[Checkpoint, float]:
    """An autoencoder run or checkpoint folder, opened, and the scale factor of its latents (from its meta.json)."""
    opened = open_checkpoint(path)
    if opened.kind != "autoencoder":
        raise ConfigError(
            f"{opened.path} holds a {opened.kind} model, not an autoencoder: train one with "
            f"train.py --preset autoencoder, and name its run folder with --autoencoder"
        )
    try:
        scale = float(checkpoint.read_json(opened.path, "meta.json")["latent_scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _unreadable(opened.path, f"no latent scale in meta.json: {error}") from None
    return opened, scale


# What a student copies from its teacher's config: the network and the schedule it was trained on, and its data.
TEACHER_FIELDS = configs.ARCHITECTURE_FIELDS + ("dataset",)


def open_teacher(path) -> Checkpoint:
    """A teacher for distillation: a class-conditional pixel-space denoiser run on a noise schedule, or a
    progressive student (its next stage); anything else is a ConfigError that says why."""
    opened = open_checkpoint(path)
    if opened.kind not in ("denoiser", "distill"):
        raise ConfigError(
            f"{opened.path} holds a {opened.kind} model: distillation here takes a class-conditional pixel-space "
            "denoiser (train.py --preset cpu) or a progressive student as its teacher"
        )
    config = opened.config
    if not config.num_classes or config.parameterization == "velocity":
        raise ConfigError(f"{opened.path} is not a class-conditional model on a noise schedule (eps, x0 or v): "
                          "distillation here needs one as its teacher")
    if opened.kind == "distill" and config.method != "progressive":
        raise ConfigError(f"{opened.path} is a consistency model, which samples with lcm, not DDIM: "
                          "it cannot teach a student; use its own teacher")
    return opened


def _student_overrides(preset: str, overrides: dict) -> dict:
    """A distillation run's overrides with its teacher pinned (see ``start_config``)."""
    opened = open_teacher(overrides.get("teacher", DistillConfig.teacher))
    teacher = opened.config
    pinned = {field: getattr(teacher, field) for field in TEACHER_FIELDS}
    method = overrides.get("method", configs.PRESETS[preset]["method"])
    if opened.kind == "distill":  # the next stage of progressive distillation
        pinned.update(teacher_steps=teacher.student_steps, guidance_min=teacher.guidance_min,
                      guidance_max=teacher.guidance_max)
    for field, value in pinned.items():
        if field in overrides and overrides[field] != value:
            raise ConfigError(f"this student has its teacher's {field} ({value!r}): leave the flag out")
    steps = pinned.get("teacher_steps", configs.PRESETS[preset].get("teacher_steps", DistillConfig.teacher_steps))
    steps = overrides.get("teacher_steps", steps)
    named = {"name": f"progressive-{steps // 2}", "sample_steps": steps // 2} if method == "progressive" else {
        "name": "consistency"}
    return {
        **named,
        **pinned,
        **overrides,
        "teacher": str(opened.path.resolve()),
        "teacher_sha256": opened.sha256,
        "teacher_method": teacher.method if opened.kind == "distill" else "",
    }


def open_base(path) -> Checkpoint:
    """A base for an adapter: a class-conditional pixel-space denoiser run (anything else is a ConfigError)."""
    opened = open_checkpoint(path)
    if opened.kind != "denoiser" or not opened.config.num_classes:
        raise ConfigError(
            f"{opened.path} holds a {opened.kind} model: LoRA here adapts a class-conditional pixel-space denoiser "
            "(train.py --preset cpu)"
        )
    return opened


def _adapter_overrides(preset: str, overrides: dict) -> dict:
    """An adapter run's overrides with its base pinned (see ``start_config``)."""
    opened = open_base(overrides.get("base", LoRAConfig.base))
    pinned = {field: getattr(opened.config, field) for field in TEACHER_FIELDS if field != "num_classes"}
    for field, value in pinned.items():
        if field in overrides and overrides[field] != value:
            raise ConfigError(f"an adapter has its base's {field} ({value!r}): leave the flag out")
    if "num_classes" in overrides:
        raise ConfigError("an adapter has its base's classes and one new class per letter: leave num_classes out")
    settings = {**configs.PRESETS[preset], **overrides}
    concept, letters = settings.get("concept", LoRAConfig.concept), settings.get("letters", LoRAConfig.letters)
    new_classes = len(letters) if concept == "letters" else 0
    return {
        **pinned,
        **overrides,
        "base": str(opened.path.resolve()),
        "base_sha256": opened.sha256,
        "base_num_classes": opened.config.num_classes,
        "num_classes": opened.config.num_classes + new_classes,
    }


def start_config(preset: str = "cpu", **overrides) -> Config:
    """The config of a new run: ``configs.make_config(preset, **overrides)``, with the runs it depends on pinned.

    A latent run's autoencoder (``autoencoder``: a run or checkpoint folder): the checkpoint it resolves to, as an
    absolute path, the sha256 of its weights, its image and latent shapes, its dataset unless given and its scale
    factor are recorded. A distillation run's teacher (``teacher``): the checkpoint, as an absolute path, the
    sha256 of its weights, its architecture and data (``TEACHER_FIELDS``), and for a progressive student as
    teacher its steps (the next stage's teacher_steps) and its guidance range. The run's name, unless given, is
    the method and the student's steps (``progressive-32``; ``consistency``)."""
    if configs.config_class(preset) is DistillConfig:
        overrides = _student_overrides(preset, overrides)
    if configs.config_class(preset) is LoRAConfig:
        overrides = _adapter_overrides(preset, overrides)
    if issubclass(configs.config_class(preset), LatentConfig):
        opened, scale = open_autoencoder(overrides.get("autoencoder", LatentConfig.autoencoder))
        ae = opened.config
        overrides = {
            "dataset": ae.dataset,
            **overrides,
            "autoencoder": str(opened.path.resolve()),
            "autoencoder_sha256": opened.sha256,
            "latent_scale": scale,
            "latent_shape": ae.autoencoder.latent_shape,
            "image_size": ae.image_size,
            "in_channels": ae.in_channels,
            **{field: getattr(ae, field) for field in ("crop", "class_names", "dataset_sha256")},
        }
    return configs.make_config(preset, **_attention_levels(preset, _dataset_overrides(preset, overrides)))


def _dataset_overrides(preset: str, overrides: dict) -> dict:
    """The dataset's part of a new run's config. A named dataset's image size and channels (``data.SHAPES``)
    unless given. A folder (``folder:PATH``): its absolute path, its class folders' names and its fingerprint
    pinned (``diffusion.folders.scan``), as many classes as it has class folders unless given (0: train
    without classes), and 32×32 RGB unless given."""
    dataset = overrides.get("dataset", configs.PRESETS[preset].get("dataset", configs.RunConfig.dataset))
    if dataset in data.SHAPES:
        size, channels = data.SHAPES[dataset]
        return {"image_size": size, "in_channels": channels, **overrides}
    if not data.is_folder(dataset):
        return overrides
    if "dataset_sha256" not in overrides:  # (a latent run has its autoencoder's pinned already)
        listing = folders.scan(dataset[len(data.FOLDER):])
        overrides = {**overrides, "dataset": data.FOLDER + str(listing.root.resolve()),
                     "class_names": listing.class_names, "dataset_sha256": listing.fingerprint}
    pinned = {}
    if "num_classes" in {f.name for f in dataclasses.fields(configs.config_class(preset))}:
        pinned["num_classes"] = overrides.get("num_classes", len(overrides["class_names"]))
    return {"image_size": 32, "in_channels": 3, **overrides, **pinned}


def _attention_levels(preset: str, overrides: dict) -> dict:
    """A denoiser preset at another image size, its attention levels not given: attention at the same levels
    of the U-Net as the preset has it (the tiny preset attends at 14 of 28×28, so at 16 of 32×32)."""
    if (configs.config_class(preset) is not configs.Config or "image_size" not in overrides
            or "attention_resolutions" in overrides or "channel_mult" in overrides):
        return overrides
    unet = configs.make_config(preset).unet
    levels = [unet.resolutions.index(r) for r in unet.attention_resolutions]
    resized = dataclasses.replace(unet, image_size=overrides["image_size"], attention_resolutions=()).resolutions
    return {**overrides, "attention_resolutions": tuple(resized[level] for level in levels)}


def load_latent_space(config: LatentConfig, run_dir) -> latent.LatentSpace:
    """The autoencoder of the latent run in ``run_dir`` (its EMA weights, checked against the pinned sha256) and
    the run's scale factor."""
    found = check_reference(_autoencoder_of(config), run_dir, run_dir)  # its weights hashed once, here
    kind, autoencoder_config = read_config(found)
    opened = Checkpoint(found, kind, autoencoder_config, config.autoencoder_sha256)
    return latent.latent_space(load_model(opened), config.latent_scale)


# --- Distillation runs ---------------------------------------------------------------------


def load_teacher(config: DistillConfig, run_dir) -> nnx.Module:
    """The teacher of the distillation run in ``run_dir``: its EMA weights, checked against the pinned sha256."""
    found = check_reference(_teacher_of(config), run_dir, run_dir)
    kind, teacher_config = read_config(found)
    return load_model(Checkpoint(found, kind, teacher_config, config.teacher_sha256))


# --- Adapters ------------------------------------------------------------------------------


def load_base(config: LoRAConfig, run_dir) -> nnx.Module:
    """The base of the adapter run in ``run_dir``: its EMA weights, checked against the pinned sha256."""
    found = check_reference(_base_of(config), run_dir, run_dir)
    kind, base_config = read_config(found)
    return load_model(Checkpoint(found, kind, base_config, config.base_sha256))


ADAPTER_FILE = "adapter.safetensors"  # in every checkpoint of an adapter run: the EMA of what it trains


def trained_variables(config: LoRAConfig):
    """What an adapter run trains: its adapter (``nnx.LoRAParam``: low-rank factors and new label rows), or for a
    full fine-tune every ``nnx.Param``."""
    return nnx.LoRAParam if config.method == "lora" else nnx.Param


def _flat(state) -> dict:
    return {"/".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def adapter_bytes(config: LoRAConfig, weights) -> bytes:
    """An adapter file: the arrays of ``weights`` (an ``nnx.State`` of what the run trains) named by their key
    paths, and the run's config as JSON in the header, in the safetensors format (no pickle: a JSON header and
    raw little-endian arrays)."""
    arrays = {name: np.asarray(variable.get_value()) for name, variable in _flat(weights).items()}
    return safetensors.numpy.save(arrays, metadata={"config": json.dumps(config.to_dict())})


class Adapter(NamedTuple):
    """An adapter file, opened: its path, its run's config, its sha256 and its arrays by key path."""

    path: Path
    config: LoRAConfig
    sha256: str
    arrays: dict


def open_adapter(path) -> Adapter:
    """An adapter run folder (its last checkpoint's file), checkpoint folder or ``adapter.safetensors`` file,
    read; a CheckpointError that says what to do if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path) / ADAPTER_FILE
    try:
        sha256 = sha256_of(path)
        with safetensors.safe_open(path, "numpy") as f:
            values = json.loads((f.metadata() or {})["config"])
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"adapter {path} does not exist: train one with train.py --preset lora") from None
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{path} is not an adapter file this code can read ({error})") from None
    try:
        config = config_from_dict(values, cls=LoRAConfig)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"adapter {path} has settings this code cannot use ({error})") from None
    return Adapter(path, config, sha256, arrays)


def attach(model: UNet, base: Checkpoint, adapter: Adapter, scale: float = 1.0) -> list:
    """Put ``adapter`` on ``model`` (loaded from the checkpoint ``base``, perhaps with adapters already), in
    place, at ``scale``; returns its ``diffusion.lora.LoRA`` wrappers (none for a full fine-tune).

    The adapter must have been trained on exactly these weights (the sha256 it pinned); a full fine-tune, which
    replaces every weight, goes on the bare base only, at scale 1.
    """
    config = adapter.config
    if config.base_sha256 != base.sha256:
        raise CheckpointError(
            f"adapter {adapter.path} was trained on a base of sha256 {config.base_sha256[:12]}…, but "
            f"{base.path} has sha256 {base.sha256[:12]}…: use it with the base it was trained on, {config.base}"
        )
    alone = not lora.adapters(model) and model.num_classes == base.config.num_classes
    if config.method == "full" and not (alone and scale == 1.0):
        raise CheckpointError(f"{adapter.path} is a full fine-tune: it replaces every weight, so it goes alone on "
                              "its base, at scale 1")
    trains = trained_variables(config)
    expected = _flat(nnx.state(nnx.eval_shape(lambda: _adapted_model(config, nnx.Rngs(0))), trains))
    found = {name: (array.shape, array.dtype) for name, array in adapter.arrays.items()}
    if found != {name: (v.shape, np.dtype(v.dtype)) for name, v in expected.items()}:
        missing = sorted(set(expected) - set(found)) or sorted(set(found) - set(expected))
        raise CheckpointError(f"adapter {adapter.path} does not hold this adapter's arrays (first difference: "
                              f"{missing[:1] or 'shapes'}): it is damaged, or made by another version")
    wrappers = adapt(model, config, nnx.Rngs(0))  # the weights are read from the file next
    trained = nnx.state(model, trains)
    for name, variable in _flat(trained).items():
        if name in found:  # the other variables are those of adapters attached before
            variable.set_value(jnp.asarray(adapter.arrays[name]))
    nnx.update(model, trained)
    lora.set_scale(wrappers, scale)
    return wrappers
