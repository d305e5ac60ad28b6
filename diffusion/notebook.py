"""What the notebooks share: the fast-mode switch and a trained model to look at.

``FAST`` is true when the environment variable ``DIFFUSION_FAST`` is 1: the
test suite runs every notebook that way, with tiny models and few steps, so
that all of them together take minutes on two CPU cores. Full mode gives the
real figures.

``trained_model()`` never downloads anything: it loads the main job's model
(``runs/default``, written by ``make demo``) when there is one, and otherwise
trains what it needs, tiny in fast mode; ``trained_text_model()`` likewise
for the text model (``runs/text``), ``trained_latent_model()`` for the latent
model (``runs/latent``) and its autoencoder (``runs/autoencoder``), ``trained_latent_text_model()`` for text
prompts in latent space (``runs/latent-text``), ``trained_student()`` for the
few-step students of the main job's model (``runs/consistency``, ``runs/progressive-N``), ``trained_adapter()``
for LoRA adapters of it (``runs/lora-A``, ``runs/lora-hollow``), ``trained_flow_run()`` for the main job's U-Net
trained with the flow-matching objective instead (``runs/flow``).
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusion import checkpoint, runs, training

FAST = os.environ.get("DIFFUSION_FAST") == "1"

# Fast mode trains the tiny preset this long: enough to see the machinery work, not to draw digits.
FAST_TRAINING_STEPS = 60


def runs_dir() -> Path:
    """Where runs live: ``$DIFFUSION_RUNS_DIR``, else the repository's ``runs/`` (notebooks run from notebooks/)."""
    if "DIFFUSION_RUNS_DIR" in os.environ:
        return Path(os.environ["DIFFUSION_RUNS_DIR"])
    here = Path.cwd()
    return here.parent / "runs" if here.name == "notebooks" else here / "runs"


def _trained_run(run_name: str, preset: str, tiny_preset: str, fast: bool, **overrides) -> Path:
    """``runs/<run_name>`` if it has a checkpoint, else the folder of a run trained now (see ``trained_model``)."""
    run_dir = runs_dir() / run_name
    if checkpoint.latest(runs.checkpoint_dir(run_dir)) is None:
        if fast:
            name, steps = f"notebook-{run_name}", FAST_TRAINING_STEPS
            choices = dict(preset=tiny_preset, name=name, steps=steps, sample_every=0)
        else:
            choices = dict(preset=preset, name=run_name)
        config = runs.start_config(**choices, runs_dir=str(runs_dir()), **overrides)
        if checkpoint.latest(runs.checkpoint_dir(config.run_dir)) is None:
            training.train(config)
        run_dir = config.run_dir
    return run_dir


def _trained(run_name: str, preset: str, tiny_preset: str, fast: bool):
    return runs.load(_trained_run(run_name, preset, tiny_preset, fast))


def trained_latent_model(fast: bool = FAST) -> runs.Loaded:
    """A latent model, loaded: ``runs/latent`` (``train.py --preset latent``) if it has a checkpoint, else trained
    now on ``runs/autoencoder`` (``train.py --preset autoencoder``), which is trained first if absent; in fast
    mode ``latent-tiny`` on ``autoencoder-tiny``, a few steps each. Its autoencoder: ``runs.load_latent_space``."""
    return runs.load(_trained_run("latent", "latent", "latent-tiny", fast, autoencoder=_trained_autoencoder(fast)))


def trained_latent_text_model(fast: bool = FAST) -> runs.Loaded:
    """A text model in latent space, loaded: ``runs/latent-text`` (``train.py --preset latent-text``) if it has a
    checkpoint, else trained now on the autoencoder of ``trained_latent_model`` (``latent-text-tiny`` in fast
    mode)."""
    return runs.load(
        _trained_run("latent-text", "latent-text", "latent-text-tiny", fast, autoencoder=_trained_autoencoder(fast))
    )


def _trained_autoencoder(fast: bool) -> str:
    """The folder of ``runs/autoencoder``, trained now if absent (``autoencoder-tiny`` in fast mode)."""
    return str(_trained_run("autoencoder", "autoencoder", "autoencoder-tiny", fast))


def trained_text_model(fast: bool = FAST) -> runs.Loaded:
    """A text model, loaded (``.model``, ``.config``, ``.checkpoint``): ``runs/text`` (``train.py --preset text
    --name text``) if it has a checkpoint, else trained now as ``trained_model`` does (``text-tiny`` in fast
    mode)."""
    return _trained("text", "text", "text-tiny", fast)


def trained_model(fast: bool = FAST):
    """``(model, config)``: the main job's EMA model if ``runs/default`` has a checkpoint, else one trained now.

    Without a checkpoint, fast mode trains the ``tiny`` preset for a few steps
    (``runs/notebook-default``); full mode trains the ``cpu`` preset into
    ``runs/default``, exactly as the main job would.
    """
    loaded = trained_run(fast)
    return loaded.model, loaded.config


def trained_run(fast: bool = FAST) -> runs.Loaded:
    """``trained_model``'s run, loaded (``runs.load``): the model with its denoiser, config and checkpoint."""
    return _trained("default", "cpu", "tiny", fast)


def trained_flow_run(fast: bool = FAST) -> runs.Loaded:
    """A flow-matching model, loaded: ``runs/flow`` (``train.py --name flow --parameterization velocity``: the
    main job's preset with the flow objective) if it has a checkpoint, else trained now as ``trained_model``
    does (``tiny`` with the flow objective in fast mode)."""
    return runs.load(_trained_run("flow", "cpu", "tiny", fast, parameterization="velocity"))


# The first stage of progressive distillation: the student of 64 teacher steps samples in 32 (4 -> 2 in fast mode).
FIRST_PROGRESSIVE_STEPS = {False: 32, True: 2}


def trained_student(method: str, steps: int | None = None, fast: bool = FAST) -> runs.Loaded:
    """A few-step student of ``trained_model``'s teacher, loaded: ``runs/consistency`` for ``method`` consistency
    (``train.py --preset consistency``), or for progressive the stage ``runs/progressive-<steps>`` (default: the
    first, 32 steps), with every stage before it trained first if absent (``train.py --preset progressive
    --teacher`` the previous one). Fast mode trains the tiny presets for a few steps (stages 2 and 1)."""
    teacher = _trained_run("default", "cpu", "tiny", fast)
    if method == "consistency":
        return runs.load(_trained_run("consistency", "consistency", "consistency-tiny", fast, teacher=str(teacher)))
    preset = "progressive-tiny" if fast else "progressive"
    stage = FIRST_PROGRESSIVE_STEPS[fast]
    steps = stage if steps is None else steps
    if steps not in [stage >> k for k in range(stage.bit_length())]:
        raise ValueError(f"the progressive stages sample in {stage}, {stage // 2}, ..., 1 steps (got {steps})")
    while stage >= steps:
        teacher = _trained_run(f"progressive-{stage}", preset, preset, fast, teacher=str(teacher))
        stage //= 2
    return runs.load(teacher)


ADAPTER_PRESETS = {"letters": "lora", "hollow": "lora-style"}  # the concepts trained_adapter knows, and their presets


def trained_adapter(concept: str = "letters", fast: bool = FAST, **overrides) -> Path:
    """The run folder of a LoRA adapter of ``trained_model``'s base: ``runs/lora-A`` (the letter A as a new class,
    ``train.py --preset lora``) or ``runs/lora-hollow`` (hollow digits, ``--preset lora-style``), trained now if
    absent (``lora-tiny`` for a few steps in fast mode). ``overrides`` (e.g. ``name="full-A", method="full"``)
    change the run trained."""
    base = _trained_run("default", "cpu", "tiny", fast)
    name = overrides.pop("name", "lora-A" if concept == "letters" else f"lora-{concept}")
    if fast:
        overrides = dict(concept=concept, prior_images=20 if concept == "letters" else 0, **overrides)
    return _trained_run(name, ADAPTER_PRESETS[concept], "lora-tiny", fast, base=str(base), **overrides)
