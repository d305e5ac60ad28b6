"""Run folders: finding a checkpoint, its kind, loading it in one call, the runs it depends on, bad folders.

The checkpoints here hold random weights (a TrainState built from shapes,
filled by NumPy): opening and loading do not depend on what was learned, and
no train step is compiled.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import leaves_equal
from diffusion import checkpoint, configs, files, runs, training
from diffusion.errors import CheckpointError

CONFIG = configs.make_config("tiny", name="tiny")


def random_state(config, seed=0):
    _, template = jax.eval_shape(lambda: training.init_state(config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype), template)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as train.py leaves it, with two checkpoints."""
    run = tmp_path / "runs" / "tiny"
    for step in (10, 20):
        checkpoint.save(runs.checkpoint_dir(run), step, random_state(CONFIG, step), CONFIG.to_dict(), {}, keep=3)
    return run


def test_a_run_folder_opens_at_its_last_checkpoint_once(run_dir):
    opened = runs.open_checkpoint(run_dir)
    last = run_dir / "checkpoints" / "step_00000020"
    assert opened == runs.Checkpoint(last, "denoiser", CONFIG, files.sha256_of(last / "state.npz"))
    assert (opened.run_name, opened.step) == ("tiny", 20)
    assert runs.open_checkpoint(run_dir / "checkpoints" / "step_00000010").step == 10  # a checkpoint folder itself
    assert json.loads((last / "config.json").read_text())["kind"] == "denoiser"


def test_load_returns_the_model_and_what_sampling_needs(run_dir):
    loaded = runs.load(run_dir)
    state = random_state(CONFIG, 20)
    assert leaves_equal(nnx.state(loaded.model), state.ema)
    assert loaded.parameterization == "v" and loaded.conditioning == runs.Conditioning("label", 10)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    labels = np.array([3, 10])
    np.testing.assert_allclose(loaded.denoiser(x, 500.0, labels), loaded.model(x, 500.0, labels), atol=1e-5)
    unconditional = configs.make_config("tiny", num_classes=0)
    folder = checkpoint.save(runs.checkpoint_dir(run_dir.parent / "u"), 1, random_state(unconditional),
                             unconditional.to_dict(), {}, keep=1)
    assert runs.load(folder).conditioning == runs.Conditioning("none")


def test_a_checkpoint_written_before_kinds_were_recorded_loads_as_a_denoiser(tmp_path):
    """The config.json of earlier versions: the Config's fields and no "kind" key (runs/default of make demo)."""
    old = dataclasses.asdict(CONFIG)  # what Config.to_dict() wrote then
    assert "kind" not in old
    state = random_state(CONFIG)
    folder = checkpoint.save(tmp_path / "default" / "checkpoints", 1600, state, old, {"data_position": 1600}, keep=3)
    loaded = runs.load(tmp_path / "default")
    assert loaded.checkpoint.kind == "denoiser" and loaded.config == CONFIG and loaded.checkpoint.path == folder
    assert leaves_equal(nnx.state(loaded.model), state.ema)


def test_bad_run_folders_say_what_is_wrong(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: train one with train.py"):
        runs.open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a run folder with checkpoints"):
        runs.open_checkpoint(tmp_path / "empty")
    last = runs.find_checkpoint(run_dir)
    (last / "config.json").write_text('{"kind": "hologram"}')
    with pytest.raises(CheckpointError, match="holds a model of kind 'hologram', which this code does not know"):
        runs.open_checkpoint(run_dir)
    (last / "config.json").write_text('{"channels": 0}')
    with pytest.raises(CheckpointError, match="has settings this code cannot use .*channels must be a whole number"):
        runs.open_checkpoint(run_dir)
    (last / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        runs.open_checkpoint(run_dir)
    earlier = runs.checkpoint_dir(run_dir) / "step_00000010"
    npz = earlier / "state.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is corrupt or incomplete"):
        runs.load(earlier)


def test_a_run_that_depends_on_another_refuses_it_once_changed(run_dir, tmp_path, monkeypatch):
    """The mechanism a latent model (its autoencoder), a student (its teacher) or an adapter (its base) uses."""
    teacher = runs.open_checkpoint(run_dir)
    student_kind = runs.Kind(
        config_from_dict=configs.config_from_dict,
        make_model=runs.make_model,
        references=lambda config: (runs.Reference("teacher", str(run_dir), teacher.sha256),),
        conditioning=lambda config: runs.Conditioning("label", config.num_classes),
    )
    monkeypatch.setitem(runs.KINDS, "student", student_kind)
    student = tmp_path / "student"
    checkpoint.save(runs.checkpoint_dir(student), 1, random_state(CONFIG), {**CONFIG.to_dict(), "kind": "student"},
                    {}, keep=1)
    assert runs.open_checkpoint(student).kind == "student"
    shutil.copy(runs.checkpoint_dir(run_dir) / "step_00000010" / "state.npz", teacher.path / "state.npz")
    with pytest.raises(CheckpointError, match=r"was made with the teacher .* of sha256 [0-9a-f]{12}…, but .* now has"):
        runs.open_checkpoint(student)
    shutil.rmtree(run_dir)
    with pytest.raises(CheckpointError, match="needs its teacher .* which cannot be read"):
        runs.open_checkpoint(student)
