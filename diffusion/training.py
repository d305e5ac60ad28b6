"""Training: the configuration, the train state, the compiled train step and the loop.

One ``Config`` holds every setting; ``make_config("tiny" | "cpu" | "gpu",
**overrides)`` starts from a preset, and ``train(config)`` runs it:

- **Step** (``train_step``). Drop labels to the null label with probability
  ``label_dropout`` (Ho & Salimans 2021), compute the objective of
  ``diffusion.losses`` and its gradient, clip the gradient's global norm,
  update with AdamW (Loshchilov & Hutter 2019) under a linear warm-up and
  cosine decay of the learning rate, and update an exponential moving average
  (EMA) of the weights, the copy used for sampling. The step is a pure
  function of (state, batch), compiled once with ``jax.jit``.
- **Randomness.** Step k's key is ``fold_in(key, k)``: labels dropped, times,
  noise and dropout depend only on the seed and the step. The k-th batch
  likewise (``diffusion.data.batches``). That is what lets a resumed run end
  bit-identical to an uninterrupted one.
- **Devices.** The step runs data-parallel over a ``jax.sharding.Mesh`` of all
  devices: each batch is split along its first axis, parameters and optimizer
  state are replicated, and XLA inserts the gradient all-reduce. The same code
  runs on one CPU, a GPU, a TPU or (with ``distributed=True``, started once per
  host) several hosts through ``jax.distributed``.
- **Run folder** ``<runs_dir>/<name>/``: ``checkpoints/`` (``diffusion.checkpoint``),
  ``metrics.jsonl`` (one JSON line per ``log_every`` steps), ``loss.png``, and
  ``samples/step_*.png``, grids drawn from the EMA model by ``diffusion.samplers``.
- **Faults.** A bad setting raises a ConfigError (a ValueError) before anything compiles; a
  NaN or infinite loss stops the run with a FloatingPointError, keeping the
  last checkpoint (which is never written with non-finite values); Ctrl-C
  finishes the current step, saves and returns; resuming a checkpoint of a
  different architecture raises a ValueError naming the differing field.
"""

from __future__ import annotations

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
from PIL import Image
from tqdm.auto import tqdm

from diffusion import checkpoint, data, guidance, losses, plotting, samplers
from diffusion.schedules import BETA_SCHEDULES, Schedule
from diffusion.unet import UNet, as_denoiser, check_architecture


class ConfigError(ValueError):
    """A bad setting, or a checkpoint or dataset that does not fit the settings; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run; each field is also a flag of ``train.py`` (``--learning-rate 1e-3``).

    The defaults are the ``cpu`` preset: class-conditional digits from the
    embedded MNIST on a laptop CPU. Invalid values raise a ValueError on
    construction (a ConfigError).
    """

    # Run
    name: str = "default"  # the run folder is <runs_dir>/<name>
    runs_dir: str = "runs"
    seed: int = 0
    resume: bool = False  # continue from the run folder's last checkpoint
    # Data
    dataset: str = "mnist-embedded"  # see diffusion.data.DATASET_NAMES
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10  # 0 trains an unconditional model
    # Network (diffusion.unet.UNet)
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
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma weighting (5 is usual); 0 = off (see docs/training.md)
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    label_dropout: float = 0.1
    # Optimisation
    batch_size: int = 64
    steps: int = 1600
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # maximum global gradient norm
    ema_decay: float = 0.995  # an average over the last ~1 / (1 - decay) = 200 steps
    compute_dtype: str = "float32"  # bfloat16: faster matmuls and convolutions on accelerators
    devices: int = 0  # how many local devices to use; 0 = all
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host runs)
    # Output
    log_every: int = 50
    checkpoint_every: int = 400
    keep_checkpoints: int = 3
    sample_every: int = 400  # a grid of samples from the EMA model every this many steps (and at the end); 0 = never
    sample_steps: int = 25  # DDIM (trailing spacing) or flow Euler steps for the grid
    sample_guidance: float = 3.0  # classifier-free guidance scale for the grid; 1 = none

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):  # lists from JSON or code become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    @property
    def noise_schedule(self) -> Schedule:
        """The schedule of the forward process this run trains on (unused by flow models)."""
        return Schedule(self.schedule, self.num_timesteps, zero_terminal_snr=self.zero_terminal_snr)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The Config fields that are arguments of diffusion.unet.UNet.
UNET_FIELDS = (
    "image_size",
    "in_channels",
    "num_classes",
    "channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "norm_groups",
    "dropout",
    "parameterization",
    "compute_dtype",
)
# The settings that decide what the network computes: a checkpoint can only be
# resumed with the same values.
ARCHITECTURE_FIELDS = tuple(f for f in UNET_FIELDS if f not in ("dropout", "compute_dtype")) + (
    "schedule",
    "num_timesteps",
    "zero_terminal_snr",
)

PRESETS = {
    # For tests and a first look: seconds on a CPU, nothing learned.
    "tiny": dict(
        channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(14,),
        norm_groups=4,
        batch_size=16,
        steps=20,
        warmup_steps=5,
        log_every=5,
        checkpoint_every=10,
        sample_every=20,
        sample_steps=2,
    ),
    # The default: the Config defaults above.
    "cpu": dict(),
    # A larger model for a GPU, on the full MNIST (or --dataset fashion-mnist); 28 is padded to 32.
    "gpu": dict(
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
    ),
}


def _validate(c: Config):
    """Raise a ValueError naming the setting to change, before anything is loaded or compiled."""

    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    def whole(name, minimum):
        value = getattr(c, name)
        need(
            isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{name} must be a whole number >= {minimum} (got {value!r})",
        )

    for name in (
        "batch_size",
        "steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "num_timesteps",
        "sample_steps",
    ):
        whole(name, 1)
    for name in ("seed", "warmup_steps", "devices", "sample_every"):
        whole(name, 0)
    need(
        bool(c.name) and "/" not in c.name and c.name not in (".", ".."),
        f"name must be a plain folder name (got {c.name!r})",
    )
    need(
        c.dataset in data.DATASET_NAMES, f"unknown dataset {c.dataset!r}; choose one of {', '.join(data.DATASET_NAMES)}"
    )
    try:
        check_architecture(**{name: getattr(c, name) for name in UNET_FIELDS})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    need(c.schedule in BETA_SCHEDULES, f"unknown schedule {c.schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    need(
        not (c.zero_terminal_snr and c.parameterization == "eps"),
        "zero_terminal_snr needs parameterization v or x0: at zero SNR an eps prediction says nothing about x0 "
        "(Lin et al. 2023, Sec. 3.2)",
    )
    need(
        c.min_snr_gamma >= 0,
        f"min_snr_gamma must be >= 0 (got {c.min_snr_gamma}); 0 turns the weighting off, 5 is usual",
    )
    need(
        not (c.min_snr_gamma and c.parameterization == "velocity"),
        "min_snr_gamma applies to eps, x0 and v on a schedule, not to flow matching; set --min-snr-gamma 0",
    )
    need(c.flow_logit_std > 0, f"flow_logit_std must be > 0 (got {c.flow_logit_std})")
    need(0.0 <= c.label_dropout < 1.0, f"label_dropout must be in [0, 1) (got {c.label_dropout}); 0.1 is usual")
    need(
        c.learning_rate > 0 and math.isfinite(c.learning_rate),
        f"learning_rate must be a positive number (got {c.learning_rate})",
    )
    need(c.warmup_steps < c.steps, f"warmup_steps ({c.warmup_steps}) must be fewer than steps ({c.steps})")
    need(c.weight_decay >= 0, f"weight_decay must be >= 0 (got {c.weight_decay})")
    need(c.grad_clip > 0, f"grad_clip must be > 0 (got {c.grad_clip}); use inf for no clipping")
    need(0.0 <= c.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {c.ema_decay}); 0.999 is usual")
    need(
        not (c.distributed and c.devices),
        "with distributed=True every device of every host is used; leave devices at 0",
    )
    need(
        c.sample_steps <= c.num_timesteps,
        f"sample_steps ({c.sample_steps}) must be at most num_timesteps ({c.num_timesteps})",
    )
    need(c.sample_guidance >= 1.0, f"sample_guidance must be >= 1 (got {c.sample_guidance}); 1 means no guidance")


def make_config(preset: str = "cpu", **overrides) -> Config:
    """The named preset ("tiny", "cpu", "gpu") with ``overrides`` applied.

    With ``resume=True`` the configuration saved in the run's last checkpoint
    takes the preset's place, so ``make_config(resume=True, name="x")``
    continues run "x" as it was started; overrides still apply (and are
    checked against the checkpoint by ``train``).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
    if overrides.get("resume"):
        # The run continues in the folder it is resumed from, even if it was renamed or moved since.
        folder = dict(runs_dir=overrides.get("runs_dir", Config.runs_dir), name=overrides.get("name", Config.name))
        ckpt_dir = Path(folder["runs_dir"]) / folder["name"] / "checkpoints"
        last = checkpoint.latest(ckpt_dir)
        if last is None:
            raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint")
        saved = config_from_dict(checkpoint.read_json(last, "config.json"))
        return dataclasses.replace(saved, **{**folder, **overrides})
    return Config(**{**PRESETS[preset], **overrides})


def config_from_dict(values: dict) -> Config:
    """A Config from a saved ``config.json`` (fields it lacks take their defaults)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


# --- Model, state and the train step ----------------------------------------------


def make_model(config: Config, rngs: nnx.Rngs) -> UNet:
    """The U-Net that ``config`` describes."""
    return UNet(**{f: getattr(config, f) for f in UNET_FIELDS}, rngs=rngs)


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


def init_state(config: Config):
    """A freshly initialised model: returns (graphdef, TrainState). The seed decides everything."""
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    graphdef, params = nnx.split(make_model(config, nnx.Rngs(init_key)))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(train_key),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(config).init(params),
    )
    return graphdef, state


def drop_labels(key, labels, p: float, null_label: int):
    """Replace each label by the null label with probability p (Ho & Salimans 2021, Algorithm 1)."""
    return jnp.where(jax.random.bernoulli(key, p, labels.shape), null_label, labels)


def ema_decay_at(step, decay: float):
    """The EMA decay at a step: min(decay, (1 + step) / (10 + step)).

    The warm-up keeps the average from being dominated by the random initial
    weights in short runs (the num_updates rule of TensorFlow's
    ExponentialMovingAverage).
    """
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def objective(config: Config):
    """The loss of ``diffusion.losses`` that ``config`` asks for, as ``(model, x0, cond, key) -> scalar``."""
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


def train_step(state: TrainState, x0, labels, *, graphdef, config: Config):
    """One optimisation step on a batch: returns (new state, metrics). Pure; compiled by ``make_train_step``."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key_labels, key_loss, key_dropout = jax.random.split(key, 3)
    cond = drop_labels(key_labels, labels, config.label_dropout, config.num_classes) if config.num_classes else None

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return objective(config)(functools.partial(model, dropout_key=key_dropout), x0, cond, key_loss)

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


def make_mesh(devices: int = 0) -> Mesh:
    """A one-axis ("data") mesh over the first ``devices`` devices (0 = all, on every host)."""
    available = jax.devices()
    if devices > len(available):
        raise ConfigError(f"devices={devices} but only {len(available)} are available: {available}")
    return Mesh(np.array(available[: devices or len(available)]), ("data",))


def make_train_step(config: Config, graphdef, mesh: Mesh):
    """``train_step`` compiled for ``mesh``: batch split over "data", state replicated, old state donated."""
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(
        functools.partial(train_step, graphdef=graphdef, config=config),
        in_shardings=(replicated, split, split),
        out_shardings=replicated,
        donate_argnums=0,
    )


def put_batch(mesh: Mesh, x: np.ndarray):
    """A global batch (the same on every host) as an array split over the mesh; each host sends its own part."""
    per_host = len(x) // jax.process_count()
    start = jax.process_index() * per_host
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), x[start : start + per_host]
    )


def put_state(mesh: Mesh, state: TrainState) -> TrainState:
    """The state replicated on every device of the mesh."""
    return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def to_host(tree):
    """NumPy copies of a pytree of replicated arrays (each host reads its own replica)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


# --- Checkpoints ---------------------------------------------------------------


def check_compatible(saved: dict, config: Config, where) -> None:
    """Raise a ValueError naming the first architecture field in which a saved config differs from ``config``."""
    saved_config = config_from_dict(saved)
    for field in ARCHITECTURE_FIELDS:
        if getattr(saved_config, field) != getattr(config, field):
            raise ConfigError(
                f"checkpoint {where} was trained with {field}={getattr(saved_config, field)!r}, "
                f"but the config asks for {field}={getattr(config, field)!r}; use the checkpoint's value "
                f"(or leave the flag out when resuming), or start a new run with another --name"
            )


def find_checkpoint(path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the last checkpoint of the run folder ``path``."""
    path = Path(path)
    if (path / "state.npz").exists():
        return path
    found = checkpoint.latest(path / "checkpoints")
    if found is None:
        raise ConfigError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return found


def load_config(path) -> Config:
    """The resolved config saved with a checkpoint (or with the last checkpoint of a run folder)."""
    return config_from_dict(checkpoint.read_json(find_checkpoint(path), "config.json"))


def load_model(path, ema: bool = True) -> UNet:
    """The U-Net saved in a checkpoint folder, or in the last checkpoint of a run folder.

    ``ema=True`` (the default) loads the moving average of the weights, the
    copy meant for sampling; ``ema=False`` the raw trained weights. Pair with
    ``diffusion.unet.as_denoiser`` to sample.
    """
    path = find_checkpoint(path)
    graphdef, template = nnx.split(nnx.eval_shape(lambda: make_model(load_config(path), nnx.Rngs(0))))
    return nnx.merge(graphdef, checkpoint.load(path, template, prefix="ema" if ema else "params"))


def _diverged(config: Config, what: str) -> FloatingPointError:
    last = checkpoint.latest(config.run_dir / "checkpoints")
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
    path = config.run_dir / "checkpoints" / f"step_{step:08d}"
    if jax.process_index() == 0:
        key = host_state.rng.tolist()
        meta = {"data_position": step, "seed": config.seed, "rng_key_data": key, "jax_version": jax.__version__, **meta}
        path = checkpoint.save(
            config.run_dir / "checkpoints", step, host_state, config.to_dict(), meta, config.keep_checkpoints
        )
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


def sample_grid(model: UNet, config: Config, per_class: int = 4) -> np.ndarray:
    """Samples from ``model`` through ``diffusion.samplers``, one row per class, as a uint8 image (H, W, C).

    DDIM with trailing spacing (flow Euler for flow models), ``config.sample_steps``
    steps, classifier-free guidance at ``config.sample_guidance``, and the same
    starting noise every time, so grids from different steps are comparable.
    """
    rows = config.num_classes or 4
    cond = jnp.repeat(jnp.arange(rows), per_class) if config.num_classes else None
    shape = (rows * per_class, config.image_size, config.image_size, config.in_channels)
    x_T = jax.random.normal(jax.random.key(config.seed), shape)
    denoiser, kind = as_denoiser(model)
    if cond is not None and config.sample_guidance > 1.0:
        denoiser = guidance.classifier_free_guidance(denoiser, config.sample_guidance, negative=config.num_classes)
    if kind == "velocity":
        run = dict(sampler="flow_euler")
    else:
        run = dict(sampler="ddim", schedule=config.noise_schedule, spacing="trailing")
    x = samplers.sample(denoiser, x_T, steps=config.sample_steps, parameterization=kind, cond=cond, **run).x
    return plotting.image_grid(np.asarray(x), ncols=per_class)


def _save_samples(config: Config, graphdef, state: TrainState) -> None:
    grid = sample_grid(nnx.merge(graphdef, to_host(state.ema)), config)
    folder = config.run_dir / "samples"
    folder.mkdir(exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
        folder / f"step_{int(to_host(state.step)):08d}.png"
    )


# --- The loop ----------------------------------------------------------------------


def load_training_data(config: Config):
    """The training split of ``config.dataset`` as (uint8 images, labels), checked against the config."""
    images, labels = data.load_dataset(config.dataset, "train")
    shape = data.to_model_range(images[:1]).shape[1:]
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
    return images, labels


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
        jax.distributed.initialize()
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.devices)
    if config.batch_size % mesh.size:
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of the {mesh.size} devices it is split over"
        )
    images, labels = load_training_data(config)
    ckpt_dir, metrics_path = config.run_dir / "checkpoints", config.run_dir / "metrics.jsonl"

    if config.resume:
        last = checkpoint.latest(ckpt_dir)
        if last is None:
            raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint")
        check_compatible(checkpoint.read_json(last, "config.json"), config, last)
        graphdef, template = jax.eval_shape(lambda: init_state(config))  # shapes only: no initialisation needed
        state = checkpoint.load(last, template)
        start = int(checkpoint.read_json(last, "meta.json")["data_position"])
        if is_main:
            _trim_metrics(metrics_path, int(state.step))
        print(f"resuming {config.run_dir} from {last.name}")
    else:
        if checkpoint.latest(ckpt_dir) is not None:
            raise ConfigError(
                f"{config.run_dir} already holds checkpoints; pass --resume to continue it, or choose another --name"
            )
        graphdef, state = init_state(config)
        start = 0
        if is_main:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
    if int(state.step) >= config.steps:
        print(f"{config.run_dir} is already at step {int(state.step)} of {config.steps}; nothing to do")
        return state

    state = put_state(mesh, state)
    step_fn = make_train_step(config, graphdef, mesh)
    batches = data.batches(images, labels, config.batch_size, config.seed, start_step=start)
    first_step, interval_losses, timed_steps, step_seconds = int(state.step) + 1, [], 0, 0.0
    bar = tqdm(total=config.steps, initial=int(state.step), disable=not is_main, desc=config.name, unit="step")
    with _CtrlC() as ctrl_c, bar:
        for done in range(int(state.step) + 1, config.steps + 1):  # done: the steps completed after this one
            x, y = next(batches)
            started = time.perf_counter()
            state, metrics = step_fn(
                state, put_batch(mesh, data.to_model_range(x)), put_batch(mesh, y.astype(np.int32))
            )
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
            if done % config.checkpoint_every == 0 or done == config.steps or ctrl_c.pressed:
                saved = _save(config, state, metrics=metrics)
                if is_main:
                    plot_loss(metrics_path, config.run_dir / "loss.png")
            if is_main and config.sample_every and (done % config.sample_every == 0 or done == config.steps):
                _save_samples(config, graphdef, state)
            if ctrl_c.pressed:
                print(f"interrupted at step {done}: saved {saved}; continue with --name {config.name} --resume")
                break
    return state
