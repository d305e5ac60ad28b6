"""Checkpoints: a training state on disk, written atomically, the last K kept, no pickle.

A checkpoint is a folder ``<directory>/step_<step>/`` holding

    state.npz    every array of the state pytree, named by its key path
                 (e.g. ``params/conv_in/kernel/value``), read with allow_pickle=False
    config.json  the resolved configuration of the run that wrote it
    meta.json    step, data position, metrics and anything else small and JSON-able

It is written into a hidden temporary folder first and renamed into place
(``diffusion.files.atomic_folder``), so a crash or Ctrl-C mid-save leaves
either the previous checkpoints or a complete new one, never a half-written
folder. Loading needs
a template pytree of the right structure (usually a freshly initialised state):
its key paths say which arrays to read, and every shape and dtype is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from diffusion import files
from diffusion.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")


def _named_leaves(tree, prefix: str = ""):
    """(name, leaf) for every leaf of ``tree``, the name being its key path joined by '/'."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        ("/".join(filter(None, [prefix, jax.tree_util.keystr(path, simple=True, separator="/")])), leaf)
        for path, leaf in leaves
    ]


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def step_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``: ``step_00001600``."""
    return f"step_{step:08d}"


def step_of(path) -> int | None:
    """The step in a checkpoint folder's name, or None if the name is not ``step_<digits>``."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def save(directory, step: int, tree, config: dict, meta: dict, keep: int, others: dict | None = None) -> Path:
    """Write ``tree`` (host or device arrays), ``config``, ``meta`` and ``others`` (more files, {name: bytes},
    e.g. an adapter run's ``adapter.safetensors``) as ``<directory>/step_<step>``.

    Atomic (``diffusion.files.atomic_folder``). Afterwards only the ``keep``
    newest checkpoints remain. Returns the checkpoint's path.
    """
    final = Path(directory) / step_name(step)
    with files.atomic_folder(final) as tmp:  # the same step saved again (Ctrl-C after a save) is replaced
        with open(tmp / "state.npz", "wb") as f:
            np.savez(f, **{name: np.asarray(leaf) for name, leaf in _named_leaves(tree)})
            f.flush()
            os.fsync(f.fileno())
        files.write_synced(tmp / "config.json", _json_bytes(config))
        files.write_synced(tmp / "meta.json", _json_bytes({"step": step, **meta}))
        for name, content in (others or {}).items():
            files.write_synced(tmp / name, content)
    for old in checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(directory) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step_of(p), p) for p in directory.iterdir() if step_of(p) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(directory) -> Path | None:
    """The newest checkpoint in ``directory``, or None if there is none."""
    found = checkpoints(directory)
    return found[-1] if found else None


def read_json(path, name: str) -> dict:
    """``config.json`` or ``meta.json`` of the checkpoint at ``path``, as a dict."""
    with open(Path(path) / name) as f:
        return json.load(f)


def load(path, template, prefix: str = ""):
    """Read the arrays of ``template``'s structure from the checkpoint at ``path``.

    ``prefix`` selects a subtree: ``load(path, params, prefix="ema")`` reads the
    arrays saved under ``ema/...``. Returns a pytree like ``template`` holding
    NumPy arrays; the template's leaves may be arrays or ``jax.ShapeDtypeStruct``s.
    A missing array, or one whose shape or dtype differs from the
    template's, raises a CheckpointError naming it.
    """
    names = _named_leaves(template, prefix)
    with np.load(Path(path) / "state.npz", allow_pickle=False) as saved:
        arrays = []
        for name, leaf in names:
            if name not in saved.files:
                raise CheckpointError(
                    f"checkpoint {path} has no array {name!r}: it was written by a different model or version"
                )
            array, shape, dtype = saved[name], tuple(leaf.shape), np.dtype(leaf.dtype)
            if array.shape != shape or array.dtype != dtype:
                raise CheckpointError(
                    f"checkpoint {path}: {name} has shape {array.shape} and dtype {array.dtype}, "
                    f"but this model expects {shape} and {dtype}"
                )
            arrays.append(array)
    return jax.tree.unflatten(jax.tree.structure(template), arrays)
