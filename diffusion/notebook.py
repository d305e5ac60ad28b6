"""What the notebooks share: the fast-mode switch and a trained model to look at.

``FAST`` is true when the environment variable ``DIFFUSION_FAST`` is 1: the
test suite runs every notebook that way, with tiny models and few steps, so
that all of them together take minutes on two CPU cores. Full mode gives the
real figures.

``trained_model()`` never downloads anything: it loads the main job's model
(``runs/default``, written by ``make demo``) when there is one, and otherwise
trains what it needs, tiny in fast mode.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusion import checkpoint, configs, runs, training

FAST = os.environ.get("DIFFUSION_FAST") == "1"

# Fast mode trains the tiny preset this long: enough to see the machinery work, not to draw digits.
FAST_TRAINING_STEPS = 60


def runs_dir() -> Path:
    """Where runs live: ``$DIFFUSION_RUNS_DIR``, else the repository's ``runs/`` (notebooks run from notebooks/)."""
    if "DIFFUSION_RUNS_DIR" in os.environ:
        return Path(os.environ["DIFFUSION_RUNS_DIR"])
    here = Path.cwd()
    return here.parent / "runs" if here.name == "notebooks" else here / "runs"


def trained_model(fast: bool = FAST):
    """``(model, config)``: the main job's EMA model if ``runs/default`` has a checkpoint, else one trained now.

    Without a checkpoint, fast mode trains the ``tiny`` preset for a few steps
    (``runs/notebook-tiny``); full mode trains the ``cpu`` preset into
    ``runs/default``, exactly as the main job would.
    """
    run_dir = runs_dir() / "default"
    if checkpoint.latest(runs.checkpoint_dir(run_dir)) is None:
        if fast:
            preset = dict(preset="tiny", name="notebook-tiny", steps=FAST_TRAINING_STEPS, sample_every=0)
        else:
            preset = dict(preset="cpu", name="default")
        config = configs.make_config(**preset, runs_dir=str(runs_dir()))
        if checkpoint.latest(runs.checkpoint_dir(config.run_dir)) is None:
            training.train(config)
        run_dir = config.run_dir
    loaded = runs.load(run_dir)
    return loaded.model, loaded.config
