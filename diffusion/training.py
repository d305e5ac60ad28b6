"""Training: the train state, the compiled train step and the loop.

``train(config)`` runs the ``diffusion.configs.Config`` of a run (from
``configs.make_config("tiny" | "cpu" | "gpu" | "text", **overrides)``, or
``runs.resume_config`` to continue one):

- **Conditions.** A class-conditional run is given each digit's label; a text
  run (``TextConfig``) a caption of each digit, drawn afresh on the host every
  step (``conditions``, from ``diffusion.captions``) and tokenized.
- **Step** (``train_step``). Drop labels to the null label with probability
  ``label_dropout`` (Ho & Salimans 2021), or prompts to the empty prompt with
  probability ``prompt_dropout``, compute the objective of
  ``diffusion.losses`` and its gradient, clip the gradient's global norm,
  update with AdamW (Loshchilov & Hutter 2019) under a linear warm-up and
  cosine decay of the learning rate, and update an exponential moving average
  (EMA) of the weights, the copy used for sampling. The step is a pure
  function of (state, batch), compiled once with ``jax.jit``.
- **Adapters.** An adapter run (``LoRAConfig``) trains only its adapter, the
  ``nnx.LoRAParam``s of ``diffusion.lora`` (or, a full fine-tune, every
  weight), on its concept's images: the state holds and checkpoints what
  trains, and the frozen base enters the step as an argument, like a teacher.
- **Randomness.** Step k's key is ``fold_in(key, k)``: labels dropped, times,
  noise and dropout depend only on the seed and the step. The k-th batch
  likewise (``diffusion.data.batches``), and its captions. That is what lets a resumed run end
  bit-identical to an uninterrupted one.
- **Devices.** The step runs data-parallel over a ``jax.sharding.Mesh`` of all
  devices: each batch is split along its first axis, parameters and optimizer
  state are replicated, and XLA inserts the gradient all-reduce. The same code
  runs on one CPU, a GPU, a TPU or several hosts: with ``distributed=True`` one
  process per host joins the others through ``jax.distributed``
  (``join_processes``: at ``coordinator``, as ``process_id`` of
  ``num_processes``, or as the cluster says), and the mesh spans every device of
  every host. Each host converts and sends only its own rows of each batch
  (``host_rows``); process 0 alone writes the run folder. Two processes on one
  CPU train to the parameters of one process (``tests/test_distributed.py``).
- **Run folder** (its layout: ``diffusion.runs``): checkpoints, ``metrics.jsonl``
  (one JSON line per ``log_every`` steps), ``loss.png``, and grids drawn from
  the EMA model by ``diffusion.samplers`` every ``sample_every`` steps.
- **State.** The train state is a plain pytree of ``nnx.State``s (``TrainState``),
  and the step a pure function of it, rather than ``nnx.Optimizer`` updating a
  module in place: so the old state can be donated to XLA, sharded over a
  mesh and written to an npz checkpoint as it is.
- **Faults.** A bad setting raises a ConfigError before anything compiles; a
  NaN or infinite loss stops the run with a FloatingPointError, keeping the
  last checkpoint (which is never written with non-finite values); Ctrl-C
  finishes the current step, saves and returns; resuming a checkpoint of a
  different architecture raises a ConfigError naming the differing field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from diffusion import (
    autoencoder, captions, checkpoint, concepts, data, distillation, files, guidance, latent, pictures, losses, runs,
    samplers,
)
from diffusion.configs import Config, LatentConfig, RunConfig, TextConfig, check_compatible
from diffusion.errors import ConfigError
from diffusion.unet import as_denoiser


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training; a pytree, checkpointed whole."""

    step: jax.Array  # int32: updates done so far, which is also the number of batches consumed
    rng: jax.Array  # uint32 key data of the training key (step k uses fold_in(key, k))
    params: nnx.State
    ema: nnx.State  # exponential moving average of params, for sampling
    opt_state: optax.OptState


def learning_rate_schedule(config: Config):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``steps`` (Loshchilov & Hutter 2017)."""
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.steps)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Clip the gradient's global norm, then AdamW under ``learning_rate_schedule``."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(learning_rate_schedule(config), weight_decay=config.weight_decay),
    )


def init_state(config: Config, teacher: nnx.Module | None = None):
    """A freshly initialised model: returns (graphdef, TrainState). The seed decides everything.

    A distilled student starts from its ``teacher``'s weights (all of them but its guidance embedding, which
    starts at zero: at first the student predicts what its unguided teacher does, at every guidance scale).
    """
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model = runs.make_model(config, nnx.Rngs(init_key))
    if teacher is not None:
        nnx.update(model, nnx.state(teacher))
    graphdef, params = nnx.split(model)
    return graphdef, fresh_state(config, params, train_key)


def fresh_state(config, params: nnx.State, train_key) -> TrainState:
    """The state before step 1: ``params`` (and their EMA, a copy), a fresh optimizer, the training key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(train_key),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(config).init(params),
    )


def init_adapter_state(config, base: nnx.Module):
    """An adapter run's model: a copy of its ``base`` with the run's adapter (``runs.adapt``; the seed draws its
    initial A and new label rows, B starts at zero). Returns (graphdef, TrainState of what trains, the frozen
    rest): only ``runs.trained_variables`` train and are checkpointed; the base's weights are read, never
    updated."""
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model = nnx.clone(base)
    runs.adapt(model, config, nnx.Rngs(init_key))
    graphdef, params, frozen = nnx.split(model, runs.trained_variables(config), ...)
    return graphdef, fresh_state(config, params, train_key), frozen


def drop_labels(key, labels, p: float, null_label: int):
    """Replace each label by the null label with probability p (Ho & Salimans 2021, Algorithm 1)."""
    return jnp.where(jax.random.bernoulli(key, p, labels.shape), null_label, labels)


def drop_prompts(key, ids, p: float, empty_ids):
    """Replace each prompt's token ids (B, L) by those of the empty prompt with probability p (prompt dropout,
    the text form of Ho & Salimans 2021, Algorithm 1)."""
    return jnp.where(jax.random.bernoulli(key, p, ids.shape[:1])[:, None], jnp.asarray(empty_ids), ids)


def conditions(config: Config, rows: np.ndarray, step: int, part: slice = slice(None)) -> np.ndarray:
    """What the model is conditioned on for the ``part`` of a batch that this host sends (``host_rows``), on the
    host: its labels, or for a text run the token ids (B, L) of captions drawn afresh for its
    ``diffusion.captions.digit_table`` rows, from a generator seeded with (seed, step), so that a resumed run draws
    the same captions. They are drawn for the whole batch (a few strings), so that a row's caption does not depend
    on how many hosts share the batch, and only the ``part`` tokenized."""
    if not isinstance(config, TextConfig):
        return rows[part].astype(np.int32)
    texts = captions.captions_of(np.random.default_rng([config.seed, step]), rows)[part]
    return config.tokenizer.encode_all(texts)


def ema_decay_at(step, decay: float):
    """The EMA decay at a step: min(decay, (1 + step) / (10 + step)).

    The warm-up keeps the average from being dominated by the random initial
    weights in short runs (the num_updates rule of TensorFlow's
    ExponentialMovingAverage).
    """
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def objective(config: RunConfig):
    """The loss that ``config`` asks for, as ``(model, x0, cond, key) -> scalar``: one of ``diffusion.losses``,
    or an autoencoder's (``diffusion.autoencoder.loss``)."""
    if config.kind == "autoencoder":
        return functools.partial(autoencoder.loss, kl_weight=config.kl_weight, reconstruction=config.reconstruction)
    if config.parameterization == "velocity":
        return functools.partial(
            losses.flow_matching_loss, logit_mean=config.flow_logit_mean, logit_std=config.flow_logit_std
        )
    return functools.partial(
        losses.denoising_loss,
        schedule=config.noise_schedule,
        parameterization=config.parameterization,
        min_snr_gamma=config.min_snr_gamma or None,
    )


def distillation_objective(config, teacher_graphdef):
    """A distillation run's loss as ``(student, target, teacher_weights, x0, labels, key) -> scalar``
    (``diffusion.distillation``): the target network (the EMA of the student) is used by consistency
    distillation only; the teacher is guided by classifier-free guidance, or, a progressive student itself,
    takes the scale as its input."""
    schedule, parameterization = config.noise_schedule, config.parameterization
    guidance_range = (config.guidance_min, config.guidance_max)

    def loss(student, target, teacher_weights, x0, labels, key):
        teacher = nnx.merge(teacher_graphdef, teacher_weights)
        if config.teacher_method:
            teacher = distillation.student_predictor(teacher, parameterization, schedule)
        else:
            teacher = distillation.guided_predictor(teacher, parameterization, schedule, config.num_classes)
        student = distillation.student_predictor(student, parameterization, schedule)
        if config.method == "progressive":
            return distillation.progressive_loss(
                student, teacher, x0, labels, key, schedule=schedule, teacher_steps=config.teacher_steps,
                guidance_range=guidance_range,
            )
        return distillation.consistency_loss(
            student, distillation.student_predictor(target, parameterization, schedule), teacher, x0, labels, key,
            schedule=schedule, origin_steps=config.origin_steps, guidance_range=guidance_range,
            loss=config.consistency_loss, huber_c=config.huber_c,
        )

    return loss


def train_step(state: TrainState, x0, cond, fixed=None, *, graphdef, config: Config, teacher_graphdef=None):
    """One optimisation step on a batch: returns (new state, metrics). Pure; compiled by ``make_train_step``.

    x0: the batch's images, as uint8 pixels or in the model range, or for a latent run the posteriors of their latents
    (``diffusion.latent.posterior_moments``), from which the step draws them.
    cond: the batch's labels (B,), or for a text run its prompts' token ids (B, L).
    fixed: weights the step reads but never updates: a distillation run's teacher's (an ``nnx.State`` of
    ``teacher_graphdef``), or an adapter run's frozen base (the rest of ``graphdef`` beside ``state.params``).
    """
    if x0.dtype == jnp.uint8:  # pixels, scaled here rather than on the host (as data.to_model_range does)
        x0 = x0.astype(jnp.float32) / 127.5 - 1.0
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key_labels, key_loss, key_dropout = jax.random.split(key, 3)
    if isinstance(config, TextConfig):
        cond = drop_prompts(key_labels, cond, config.prompt_dropout, config.tokenizer.empty_ids)
    elif config.num_classes:
        cond = drop_labels(key_labels, cond, config.label_dropout, config.num_classes)
    else:
        cond = None
    if isinstance(config, LatentConfig):
        key_loss, key_latents = jax.random.split(key_loss)
        x0 = latent.sample_latents(x0, key_latents, config.latent_scale)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, fixed) if config.kind == "lora" else nnx.merge(graphdef, params)
        if config.kind != "autoencoder":  # (an autoencoder has no dropout)
            model = functools.partial(model, dropout_key=key_dropout)
        if config.kind == "distill":
            target = nnx.merge(graphdef, state.ema)
            return distillation_objective(config, teacher_graphdef)(model, target, fixed, x0, cond, key_loss)
        return objective(config)(model, x0, cond, key_loss)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    optimizer = make_optimizer(config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_schedule(config)(state.step),
    }
    return TrainState(state.step + 1, state.rng, params, ema, opt_state), metrics


def join_processes(config: RunConfig) -> None:
    """Join the other processes of a ``distributed`` run (``jax.distributed.initialize``), before anything touches
    a device: at ``config.coordinator`` (process 0 listens there) as process ``process_id`` of ``num_processes``,
    or where those are not given as the cluster says (SLURM, Open MPI). Processes on CPUs all-reduce through gloo.
    Does nothing if this process has joined already."""
    if jax.distributed.is_initialized():
        return
    if not jax.config.jax_cpu_collectives_implementation:  # (gloo is JAX 0.10's default; older ones had none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = {}
    if config.coordinator:
        given = dict(
            coordinator_address=config.coordinator, num_processes=config.num_processes, process_id=config.process_id
        )
    try:
        jax.distributed.initialize(**given)  # (returns once every process has connected)
    except ValueError as error:  # nothing given, and no cluster to read it from
        raise ConfigError(
            f"distributed=True, but JAX found no cluster to join ({error}): give every process --coordinator "
            "HOST:PORT --num-processes N --process-id I (docs/training.md), or pass --no-distributed"
        ) from None
    # A first collective while the processes are in step opens their connections: gloo gives up on one that the
    # others do not open within 30 s, and later some host may load or compile for longer than that.
    multihost_utils.sync_global_devices("joined")


def make_mesh(devices: int = 0) -> Mesh:
    """A one-axis ("data") mesh over the first ``devices`` devices (0 = all, on every host)."""
    available = jax.devices()
    if devices > len(available):
        raise ConfigError(f"devices={devices} but only {len(available)} are available: {available}")
    return Mesh(np.array(available[: devices or len(available)]), ("data",))


def make_train_step(config: Config, graphdef, mesh: Mesh, teacher_graphdef=None):
    """``train_step`` compiled for ``mesh``: batch split over "data", state replicated, old state donated; a
    distillation run's step takes the teacher's weights (of ``teacher_graphdef``), an adapter run's its frozen
    base, as a fourth, replicated argument."""
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    fixed = (replicated,) if teacher_graphdef is not None or config.kind == "lora" else ()
    return jax.jit(
        functools.partial(train_step, graphdef=graphdef, config=config, teacher_graphdef=teacher_graphdef),
        in_shardings=(replicated, split, split) + fixed,
        out_shardings=replicated,
        donate_argnums=0,
    )


def host_rows(batch_size: int) -> slice:
    """The rows of a global batch that this host's devices take: the process_index-th of process_count equal parts
    (all of them on one host)."""
    per_host = batch_size // jax.process_count()
    return slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)


def put_batch(mesh: Mesh, x: np.ndarray):
    """This host's rows of a global batch (``host_rows``; the whole batch on one host) as the global array, split
    over the mesh: each host sends only its own part."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), x)


def put_state(mesh: Mesh, state: TrainState) -> TrainState:
    """The state replicated on every device of the mesh."""
    return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def to_host(tree):
    """NumPy copies of a pytree of replicated arrays (each host reads its own replica)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


# --- Checkpoints ---------------------------------------------------------------


def _diverged(config: Config, what: str) -> FloatingPointError:
    last = checkpoint.latest(runs.checkpoint_dir(config.run_dir))
    kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"
    return FloatingPointError(
        f"training diverged: {what}. Stopped without saving; {kept}. "
        f"Try a lower --learning-rate (now {config.learning_rate:g}), a longer --warmup-steps or a smaller --grad-clip."
    )


def _save(config: Config, state: TrainState, **meta) -> Path:
    """Checkpoint the state from host 0, every host waiting for it; never one with non-finite parameters."""
    host_state = to_host(state)
    step = int(host_state.step)
    if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(host_state.params)):
        raise _diverged(config, f"the parameters after step {step} are not all finite")
    directory = runs.checkpoint_dir(config.run_dir)
    path = directory / checkpoint.step_name(step)
    if jax.process_index() == 0:
        key = host_state.rng.tolist()
        meta = {"data_position": step, "seed": config.seed, "rng_key_data": key, "jax_version": jax.__version__, **meta}
        others = {runs.ADAPTER_FILE: runs.adapter_bytes(config, host_state.ema)} if config.kind == "lora" else {}
        checkpoint.save(directory, step, host_state, config.to_dict(), meta, config.keep_checkpoints, others)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step}")
    return path


# --- Metrics and pictures --------------------------------------------------------


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the metric lines up to ``last_step`` (a resumed run rewrites what came after)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Draw the loss curve of a ``metrics.jsonl`` into a PNG (log scale)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100)


def sample_grid(model, config: Config, per_class: int = 4, space: latent.LatentSpace | None = None) -> np.ndarray:
    """Samples from ``model`` through ``diffusion.samplers``, one row per class (per prompt of
    ``captions.EXAMPLE_PROMPTS`` for a text run), as a uint8 image (H, W, C).

    DDIM with trailing spacing (flow Euler for flow models; a distilled student's own
    sampler, ``DistillConfig.sampling``), ``config.sample_steps``
    steps, classifier-free guidance at ``config.sample_guidance``, and the same
    starting noise every time, so grids from different steps are comparable.
    A latent run's samples are decoded by its ``space``.
    """
    if isinstance(config, TextConfig):
        rows, negative = len(captions.EXAMPLE_PROMPTS), config.tokenizer.empty_ids
        cond = jnp.repeat(config.tokenizer.encode_all(captions.EXAMPLE_PROMPTS), per_class, axis=0)
    else:
        rows, negative = config.num_classes or 4, config.num_classes
        cond = jnp.repeat(jnp.arange(rows), per_class) if config.num_classes else None
    shape = (rows * per_class, config.unet.image_size, config.unet.image_size, config.unet.in_channels)
    x_T = jax.random.normal(jax.random.key(config.seed), shape)
    denoiser, kind = as_denoiser(model)
    if config.kind == "distill":  # the sampler it was distilled for; guidance is an input of the student
        denoiser = guidance.embedded_guidance(denoiser, config.sample_guidance)
        run = dict(schedule=config.noise_schedule, key=jax.random.key(config.seed + 1), **config.sampling)
    elif kind == "velocity":
        run = dict(sampler="flow_euler")
    else:
        run = dict(sampler="ddim", schedule=config.noise_schedule, spacing="trailing")
    if config.kind != "distill" and cond is not None and config.sample_guidance > 1.0:
        denoiser = guidance.classifier_free_guidance(denoiser, config.sample_guidance, negative=negative)
    x = samplers.sample(denoiser, x_T, steps=config.sample_steps, parameterization=kind, cond=cond, **run).x
    return pictures.image_grid(np.asarray(x if space is None else space.decode(x)), ncols=per_class)


def reconstruction_grid(model: autoencoder.Autoencoder, images: np.ndarray, ncols: int = 8) -> np.ndarray:
    """uint8 ``images`` and the autoencoder's reconstructions of them (decoded posterior means), in pairs of
    rows: ``ncols`` originals, then their reconstructions below, as a uint8 image (H, W, C)."""
    x = data.to_model_range(images)
    x_hat = np.asarray(model.decode(model.encode(x)[0]))
    pairs = [(x[start : start + ncols], x_hat[start : start + ncols]) for start in range(0, len(x), ncols)]
    rows = [row for pair in pairs for row in pair]
    return pictures.image_grid(np.concatenate(rows), ncols=ncols)


def grid_of(config: RunConfig, space: latent.LatentSpace | None = None):
    """``draw(model) -> uint8 image``, the grid a run saves as it trains: samples (decoded by ``space`` for a
    latent run), or for an autoencoder its reconstructions of the first 16 test images."""
    if config.kind == "autoencoder":
        shown = data.load_run_data(config, "test")[0][:16]
        return functools.partial(reconstruction_grid, images=shown)
    return functools.partial(sample_grid, config=config, space=space)


def _save_samples(config: RunConfig, model, step: int, draw) -> None:
    grid = draw(model)
    path = runs.samples_path(config.run_dir, step)
    files.write_atomically({path: pictures.png_bytes(grid, {})})


def kind_meta(config: RunConfig, graphdef, state: TrainState, train_images) -> dict:
    """What a checkpoint of this kind records in meta.json beyond every kind's entries: for an autoencoder the
    scale factor of its latents (``diffusion.latent.latent_scale``, from the EMA weights)."""
    if config.kind != "autoencoder":
        return {}
    space = latent.latent_space(nnx.merge(graphdef, to_host(state.ema)), 1.0)
    return {"latent_scale": latent.latent_scale(latent.posterior_moments(space, train_images[: latent.SCALE_IMAGES]))}


# --- The loop ----------------------------------------------------------------------


def load_training_data(config: RunConfig, space: latent.LatentSpace | None = None):
    """The training split of ``config.dataset`` as (uint8 images, labels), checked against the config; for a text
    run the labels are the rows of ``diffusion.captions.digit_table`` (label and attribute bins); for a latent run
    the images are encoded by its ``space`` into the posteriors of their latents (``latent.posterior_moments``); for
    an adapter run they are its concept's (``diffusion.concepts``). A folder's images are those its fingerprint
    pinned (``diffusion.folders``), prepared as the config says, perhaps larger for random crops."""
    if data.is_folder(config.dataset):
        pixels, labels = _folder_data(config)
        return (pixels, labels) if space is None else (latent.posterior_moments(space, pixels), labels)
    pixels, labels = data.load_dataset(config.dataset, "train")
    shape = data.to_model_range(pixels[:1]).shape[1:]
    if shape != (config.image_size, config.image_size, config.in_channels):
        raise ConfigError(
            f"dataset {config.dataset} has images of shape {shape}, "
            f"but the config says image_size={config.image_size}, "
            f"in_channels={config.in_channels}"
        )
    if config.num_classes and labels.max() >= config.num_classes:
        raise ConfigError(
            f"dataset {config.dataset} has labels up to {labels.max()}, but num_classes={config.num_classes}"
        )
    if isinstance(config, TextConfig):  # (in latents too: the captions measure the pixels)
        labels = captions.digit_table(pixels, labels)
    if config.kind == "lora":  # the new concept: rendered letters under new labels, or digits drawn in a style
        chosen = np.random.default_rng(config.seed).permutation(len(pixels))  # (the digits come grouped by class)
        if config.concept == "letters":
            letters, index = concepts.render_letters(config.letters, config.concept_images, config.seed)
            prior = chosen[: config.prior_images]
            return (np.concatenate([letters, pixels[prior]]),
                    np.concatenate([config.base_num_classes + index, labels[prior]]))
        chosen = chosen[: config.concept_images]
        return concepts.stylize(pixels[chosen], config.concept), labels[chosen]
    if space is not None:
        return latent.posterior_moments(space, pixels), labels
    return pixels, labels


def _folder_data(config: RunConfig):
    """A folder's training images and labels, after checking it is the folder the run started on; says in a line
    what was read (and which files could not be)."""
    folder = data.load_folder(config, pinned=True)
    names = config.class_names
    classes = f"{len(names)} classes ({', '.join(names)})" if names else "no classes"
    print(f"{config.dataset}: {len(folder.images)} images, {classes}, from {folder.cache}")
    if folder.unreadable:
        shown = "; ".join(folder.unreadable[:5]) + (" ..." if len(folder.unreadable) > 5 else "")
        print(f"  skipped {len(folder.unreadable)} file(s) that could not be decoded: {shown}")
    labels = folder.labels if config.num_classes else np.zeros(len(folder.labels), np.int32)  # (0: no classes)
    return folder.images, labels


def _on_any_host(flag: bool) -> bool:
    """Whether ``flag`` holds on any host (on one host: ``flag``), e.g. a Ctrl-C that reached only some of them."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.array(flag)).any())


def host_batches(config: RunConfig, images, labels, start: int):
    """What this host sends for each step from ``start`` on: ``(x, cond)`` for its rows of the step's batch
    (``host_rows``). x: the images as uint8 pixels (N, H, W, C), cropped and flipped if the config says
    (``data.augment``, drawn for the whole batch from a generator seeded by the step, so that neither a resumed run
    nor the number of hosts changes them), which the train step scales on the device (a quarter of the bytes of
    float32); or a latent run's posteriors. cond: their ``conditions``."""
    rows = host_rows(config.batch_size)
    batches = data.batches(images, labels, config.batch_size, config.seed, start_step=start)
    for step, (x, y) in enumerate(batches, start):
        if config.crop == "random" or config.flip:
            x = data.augment(x, np.random.default_rng([config.seed, step, 1]), config.image_size, config.flip)
        x = x[rows]
        yield (x[..., np.newaxis] if x.ndim == 3 else x), conditions(config, y, step, rows)


class _CtrlC:
    """While active, the first Ctrl-C only sets ``pressed``; a second one interrupts as usual."""

    def __init__(self):
        self.pressed = False

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort without saving)", flush=True)

    def __enter__(self):
        self.main_thread = threading.current_thread() is threading.main_thread()
        if self.main_thread:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.main_thread:
            signal.signal(signal.SIGINT, self.previous)


def train(config: Config, callback=None) -> TrainState:
    """Train as ``config`` says, in ``config.run_dir``; returns the final TrainState.

    ``callback(step, metrics)``, if given, is called on the host after every
    step with the metrics as floats (e.g. for a live plot in a notebook).
    Raises ConfigError (a ValueError) for a bad setup, before compiling, FloatingPointError
    when the loss stops being finite. Ctrl-C saves a checkpoint and returns
    early; ``resume=True`` picks up where the last checkpoint left off.
    """
    if config.distributed:
        join_processes(config)
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.devices)
    if config.batch_size % mesh.size:
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of the {mesh.size} devices it is split over"
        )
    for folder in (Path(config.runs_dir), config.run_dir):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a folder: choose another --runs-dir or --name")
    space = runs.load_latent_space(config, config.run_dir) if isinstance(config, LatentConfig) else None
    teacher = runs.load_teacher(config, config.run_dir) if config.kind == "distill" else None
    base = runs.load_base(config, config.run_dir) if config.kind == "lora" else None
    train_images, train_labels = load_training_data(config, space)
    draw = grid_of(config, space) if config.sample_every else None
    metrics_path = config.run_dir / "metrics.jsonl"
    frozen = None  # an adapter run's frozen base weights

    if config.resume:
        last = runs.last_to_resume(config.run_dir)
        check_compatible(runs.read_config(last)[1], config, last)
        if base is not None:
            graphdef, template, frozen = init_adapter_state(config, base)
        else:
            graphdef, template = jax.eval_shape(lambda: init_state(config))  # shapes only: no initialisation needed
        state = checkpoint.load(last, template)
        start = int(checkpoint.read_json(last, "meta.json")["data_position"])
        if is_main:
            _trim_metrics(metrics_path, int(state.step))
        print(f"resuming {config.run_dir} from {last.name}")
    else:
        if checkpoint.latest(runs.checkpoint_dir(config.run_dir)) is not None:
            raise ConfigError(
                f"{config.run_dir} already holds checkpoints; pass --resume to continue it, or choose another --name"
            )
        graphdef, state, frozen = init_adapter_state(config, base) if base is not None else (
            *init_state(config, teacher), None)
        start = 0
        if is_main:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
    if int(state.step) >= config.steps:
        print(f"{config.run_dir} is already at step {int(state.step)} of {config.steps}; nothing to do")
        return state

    state = put_state(mesh, state)
    if teacher is not None:
        teacher_graphdef, teacher_weights = nnx.split(teacher)
        compiled, teacher_weights = make_train_step(config, graphdef, mesh, teacher_graphdef), put_state(
            mesh, teacher_weights)
        step_fn = lambda state, x, cond: compiled(state, x, cond, teacher_weights)  # noqa: E731
    elif frozen is not None:
        compiled, frozen = make_train_step(config, graphdef, mesh), put_state(mesh, frozen)
        step_fn = lambda state, x, cond: compiled(state, x, cond, frozen)  # noqa: E731
    else:
        step_fn = make_train_step(config, graphdef, mesh)

    def ema_model():  # the moving average of the weights (with an adapter run's frozen base), for the grids
        return nnx.merge(graphdef, to_host(state.ema), *([] if frozen is None else [to_host(frozen)]))

    prepared = data.prefetch(host_batches(config, train_images, train_labels, start))
    first_step, interval_losses, timed_steps, step_seconds = int(state.step) + 1, [], 0, 0.0
    bar = tqdm(total=config.steps, initial=int(state.step), disable=not is_main, desc=config.name, unit="step")
    with _CtrlC() as ctrl_c, bar, contextlib.closing(prepared):
        for done in range(int(state.step) + 1, config.steps + 1):  # done: the steps completed after this one
            x, cond = next(prepared)
            started = time.perf_counter()
            state, metrics = step_fn(state, put_batch(mesh, x), put_batch(mesh, cond))
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step to finish
            if done > first_step:  # the first step of a session includes compiling: not timed
                timed_steps, step_seconds = timed_steps + 1, step_seconds + time.perf_counter() - started
            if not math.isfinite(metrics["loss"]):
                raise _diverged(config, f"the loss is {metrics['loss']} at step {done}")
            if callback is not None:
                callback(done, metrics)
            images_per_s = timed_steps * config.batch_size / step_seconds if timed_steps else 0.0
            interval_losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)

            if is_main and (done % config.log_every == 0 or done == config.steps):
                row = {"step": done, **metrics, "loss": float(np.mean(interval_losses)), "images_per_s": images_per_s}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                interval_losses = []
            stop = _on_any_host(ctrl_c.pressed)  # (every host saves and stops at the same step)
            if done % config.checkpoint_every == 0 or done == config.steps or stop:
                meta = kind_meta(config, graphdef, state, train_images) if is_main else {}
                saved = _save(config, state, metrics=metrics, **meta)
                if is_main:
                    plot_loss(metrics_path, config.run_dir / "loss.png")
            if is_main and config.sample_every and (done % config.sample_every == 0 or done == config.steps):
                _save_samples(config, ema_model(), done, draw)
            if stop:
                print(f"interrupted at step {done}: saved {saved}; continue with --name {config.name} --resume")
                break
    return state
