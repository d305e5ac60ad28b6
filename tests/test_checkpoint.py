"""Checkpoints and atomic files: round trip, keep the last K, nothing half-written."""

import os

import jax
import numpy as np
import pytest

from diffusion import checkpoint, files


def test_checkpoints_round_trip_keep_last_k_and_are_atomic(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "opt": [np.int32(7), np.ones(2, np.float64)]}
    for step in (1, 2, 3, 4):
        path = checkpoint.save(tmp_path, step, tree, {"channels": 8}, {"note": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert checkpoint.latest(tmp_path) == path
    assert checkpoint.read_json(path, "meta.json") == {"step": 4, "note": 4}
    loaded = checkpoint.load(path, tree)
    assert all(
        np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree))
    )

    # A save that fails halfway leaves the existing checkpoints as they were and no debris.
    class Unsaveable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(tmp_path, 5, {"w": Unsaveable()}, {}, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]

    with pytest.raises(ValueError, match=r"w has shape \(2, 3\).*expects \(3, 2\)"):
        checkpoint.load(path, {"w": np.zeros((3, 2), np.float32), "opt": tree["opt"]})
    with pytest.raises(ValueError, match="has no array 'bias'"):
        checkpoint.load(path, {"bias": np.zeros(1)})


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out"
    files.write_atomically({target / "a.png": b"one", target / "b.gif": b"two"})
    assert (target / "a.png").read_bytes() == b"one" and (target / "b.gif").read_bytes() == b"two"
    assert oct((target / "a.png").stat().st_mode & 0o777) == oct(0o644)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # fails after the temporary files are written
    with pytest.raises(OSError, match="No space left"):
        files.write_atomically({target / "a.png": b"new", target / "c.png": b"three"})
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.gif"]
    assert (target / "a.png").read_bytes() == b"one"
