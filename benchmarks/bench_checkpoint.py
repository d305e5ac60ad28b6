"""Checkpoints side by side: the project's npz format against Orbax, at the gpu preset's size and ~10× larger.

    .venv/bin/python benchmarks/bench_checkpoint.py [--repeats 3] [--channels 64,192] [--dir /tmp] [--warm]

For each model (the ``gpu`` preset, channels 64, and the same U-Net with
``--channels`` scaled so that it has ~9× the parameters) one child process
builds the whole train state with ``training.init_state`` (parameters, their
EMA, AdamW's two moments, step and key), fills every float array with random
values of a trained run's magnitudes (a fresh state's zero moments would
flatter a compressing format), places it on the one-device mesh as
``train.py`` does, and then, round after round, saves and restores it with:

- **npz**: ``training._save`` (what the training loop calls: ``to_host``, the
  finiteness check, ``diffusion.checkpoint.save``), and the resume path's
  ``checkpoint.latest`` + ``checkpoint.load`` + ``read_json`` + ``put_state``;
- **Orbax, synchronous**: an ``orbax.checkpoint.CheckpointManager`` (max_to_keep
  3, as ``keep_checkpoints``) saving the state with ``StandardSave`` and the
  config and meta as JSON; restored by a fresh manager with ``StandardRestore``
  onto the same replicated sharding;
- **Orbax, asynchronous**: the same with ``enable_async_checkpointing``; ``save``
  returns once the arrays are copied off the device ("until training can go
  on"), the files are written by a background thread (``wait_until_finished``).

Round 0 is a warm-up and not counted; the formats' order rotates each round;
medians of ``--repeats`` rounds are printed. Every restore is checked
bit-identical to the saved state (every leaf's bytes, dtype, shape and the
pytree's structure). Before each restore the checkpoint's files are flushed and
dropped from the page cache (``posix_fadvise(DONTNEED)``), so restores read the
disk as a resumed run after a crash or preemption would (``--warm`` skips that).

Memory is the peak resident set of the process during the operation minus its
resident set just before (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, after ``gc.collect`` and ``malloc_trim``). On this
CPU backend the "device" arrays are host memory and ``np.asarray`` of one is a
view, so npz's ``to_host`` copies nothing here; on a GPU both formats copy the
state to host memory first (see docs/checkpoints.md). A restore's peak includes
the restored state itself.

Orbax is ``orbax-checkpoint`` (requirements-bench.txt; it is already installed
as a dependency of Flax). The library does not use it.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffusion import cpu

if __name__ == "__main__":
    cpu.restart_with_huge_pages()  # the process train.py runs as (the children inherit it)

MIB = 2**20
FORMATS = ("npz", "orbax", "orbax-async")


# --- Memory and files ---------------------------------------------------------------


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _settle() -> None:
    """Free what can be freed and hand glibc's free memory back to the kernel, so that RSS is what is held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(out: dict, key: str):
    """Record in ``out[key]`` the peak RSS during the block above the RSS just before it (bytes)."""
    _settle()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    yield
    out[key] = _status("VmHWM") - before


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Flush the checkpoint's files and drop them from the page cache, so the next read comes from disk."""
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def describe_files(path: Path) -> dict:
    """What a checkpoint folder holds: bytes, files, how many are JSON, and any that starts like a pickle."""
    found = files_of(path)
    as_json, pickles = 0, []
    for f in found:
        with open(f, "rb") as opened:
            head = opened.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocols 2-5 start \x80<protocol>
            pickles.append(str(f.relative_to(path)))
        if f.stat().st_size < 16 * MIB:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                json.loads(f.read_bytes())
                as_json += 1
    return {
        "bytes": sum(f.stat().st_size for f in found),
        "files": len(found),
        "json_files": as_json,
        "pickle_like": pickles,
        "names": sorted({f.name if len(f.name) < 32 else "<content-addressed data file>" for f in found}),
    }


# --- The child: one model, every format, several rounds ----------------------------------


def trained_like(state, seed: int = 0):
    """``state`` with random float values of a trained run's magnitudes (same structure, shapes and dtypes).

    Parameters: their initial values + N(0, 0.02); EMA: the parameters + N(0, 0.001); AdamW's first moment
    N(0, 1e-3), second moment its square's size (N(0, 1e-3)²). Integer leaves (step, key, counts) are kept.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def noise(x, scale):
        return rng.standard_normal(np.shape(x), dtype=np.float32).astype(x.dtype) * np.asarray(scale, x.dtype)

    def moment(path, x):
        if not np.issubdtype(x.dtype, np.floating):
            return x
        value = noise(x, 1e-3)
        return value * value if ".nu" in jax.tree_util.keystr(path) else value

    params = jax.tree.map(lambda p: np.asarray(p) + noise(p, 0.02), state.params)
    ema = jax.tree.map(lambda p: p + noise(p, 1e-3), params)
    opt_state = jax.tree_util.tree_map_with_path(moment, state.opt_state)
    return dataclasses.replace(state, params=params, ema=ema, opt_state=opt_state)


def identical(a, b) -> bool:
    """The two pytrees have the same structure and every leaf the same dtype, shape and bytes."""
    import jax
    import numpy as np

    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)):
            return False
    return True


def measure(channels: int, repeats: int, directory: Path, warm: bool) -> dict:
    """Run in a child process: every measurement of one model size. Returns the results as a dict."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    from diffusion import checkpoint, configs, runs, training

    config = configs.make_config("gpu", **({} if channels == 64 else {"channels": channels}),
                                 runs_dir=str(directory), name=f"npz-{channels}")
    started = time.perf_counter()
    _, state = training.init_state(config)
    state = trained_like(state)
    mesh = training.make_mesh(1)
    state = jax.block_until_ready(training.put_state(mesh, state))
    build_s = time.perf_counter() - started
    # What a resuming run starts from: shapes only (train.py's template), and for Orbax the sharding to restore onto.
    template = jax.eval_shape(lambda: training.init_state(config))[1]
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), template)

    npz_dir = runs.checkpoint_dir(config.run_dir)
    orbax_dirs = {f: directory / f"{f}-{channels}" for f in FORMATS[1:]}
    managers = {
        f: ocp.CheckpointManager(
            orbax_dirs[f],
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep_checkpoints, enable_async_checkpointing=(f == "orbax-async")
            ),
        )
        for f in FORMATS[1:]
    }

    def orbax_meta(state, step):  # what training._save records in meta.json
        return {"step": step, "data_position": step, "seed": config.seed,
                "rng_key_data": np.asarray(state.rng).tolist(), "jax_version": jax.__version__, "metrics": {}}

    def save(fmt, state, step, out):
        if fmt == "npz":
            with peak_memory(out, "save_peak"):
                t = time.perf_counter()
                path = training._save(config, state, metrics={})
                out["save_s"] = out["save_blocking_s"] = time.perf_counter() - t
            return path
        manager = managers[fmt]
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            meta=ocp.args.JsonSave(orbax_meta(state, step)),
        )
        with peak_memory(out, "save_peak"):
            t = time.perf_counter()
            manager.save(step, args=args)
            out["save_blocking_s"] = time.perf_counter() - t
            out["during_async_save"] = sorted(p.name for p in orbax_dirs[fmt].iterdir())
            manager.wait_until_finished()
            out["save_s"] = time.perf_counter() - t
        return orbax_dirs[fmt] / str(step)

    def restore(fmt, out):
        with peak_memory(out, "restore_peak"):
            t = time.perf_counter()
            if fmt == "npz":  # train.py's resume path
                last = checkpoint.latest(npz_dir)
                host = checkpoint.load(last, template)
                checkpoint.read_json(last, "meta.json")
                restored = jax.block_until_ready(training.put_state(mesh, host))
                del host
            else:  # a fresh manager, as a resumed process would make
                with ocp.CheckpointManager(orbax_dirs[fmt]) as manager:
                    got = manager.restore(
                        manager.latest_step(),
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
                    )
                restored = jax.block_until_ready(got.state)
                del got
            out["restore_s"] = time.perf_counter() - t
        return restored

    rounds = []
    for r in range(repeats + 1):
        step = config.checkpoint_every * (r + 1)
        saved_state = dataclasses.replace(state, step=jax.device_put(jnp.asarray(step, jnp.int32), replicated))
        order = FORMATS[r % 3:] + FORMATS[: r % 3]
        row = {}
        for fmt in order:
            out = {}
            path = save(fmt, saved_state, step, out)
            out["files"] = describe_files(path)
            if not warm:
                evict(path)
            restored = restore(fmt, out)
            out["exact"] = identical(restored, saved_state)
            del restored
            row[fmt] = out
        rounds.append(row)
    for manager in managers.values():
        manager.close()

    leaves = jax.tree.leaves(state)
    return {
        "channels": channels,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "state_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
        "arrays": len(leaves),
        "build_s": build_s,
        "rounds": rounds[1:],  # round 0 is the warm-up
        "warmup": rounds[0],
    }


# --- The parent: run the children, print the tables ------------------------------------


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return f"{os.cpu_count()} cores of {model}, {memory / 2**30:.0f} GiB"


def filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), e.g. ext4."""
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, kind)
    return best[1]


def versions() -> str:
    from importlib.metadata import version

    names = ("jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy")
    return f"Python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names)


def report(result: dict) -> None:
    rounds = result["rounds"]

    def med(fmt, key):
        return statistics.median(r[fmt][key] for r in rounds)

    state_mib = result["state_bytes"] / MIB
    print(f"\n### channels {result['channels']}: {result['params']:,} parameters; the train state "
          f"(params, EMA, AdamW mu and nu, step, key) is {result['arrays']} arrays, {state_mib:.1f} MiB\n")
    print("| format | save: until training goes on | save: until on disk | restore (cold cache) | on disk | files "
          "| peak extra RAM, save | peak extra RAM, restore | restore exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in FORMATS:
        files = rounds[0][fmt]["files"]
        exact = all(r[fmt]["exact"] for r in rounds + [result["warmup"]])
        print(f"| {fmt} | {med(fmt, 'save_blocking_s'):.2f} s | {med(fmt, 'save_s'):.2f} s | "
              f"{med(fmt, 'restore_s'):.2f} s | {files['bytes'] / MIB:.1f} MiB | {files['files']} | "
              f"{med(fmt, 'save_peak') / MIB:.0f} MiB | {med(fmt, 'restore_peak') / MIB:.0f} MiB "
              f"({med(fmt, 'restore_peak') / result['state_bytes']:.2f}× the state) | "
              f"{'yes' if exact else 'NO'} |")
    print("\nratios to npz (medians; < 1: Orbax smaller or faster):\n")
    print("| format | save until training goes on | save until on disk | restore | bytes | RAM save | RAM restore |")
    print("|---|---|---|---|---|---|---|")
    for fmt in FORMATS[1:]:
        cells = [med(fmt, k) / med("npz", k) for k in ("save_blocking_s", "save_s", "restore_s")]
        cells.append(rounds[0][fmt]["files"]["bytes"] / rounds[0]["npz"]["files"]["bytes"])
        cells += [med(fmt, k) / max(med("npz", k), 1) for k in ("save_peak", "restore_peak")]
        print(f"| {fmt} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    spread = {fmt: [f"{r[fmt]['save_s']:.2f}/{r[fmt]['restore_s']:.2f}" for r in rounds] for fmt in FORMATS}
    print(f"\nevery round, save s / restore s: {spread}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="64,192",
                        help="base channels of the models measured (64: the gpu preset; 192: 9.0x its parameters)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model, after one warm-up round")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder "
                                                     "under /tmp, removed afterwards)")
    parser.add_argument("--warm", action="store_true", help="restore from the page cache (skip the eviction)")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.repeats, Path(args.dir), args.warm)))
        return

    base = Path(tempfile.mkdtemp(prefix="bench_checkpoint.", dir=args.dir or "/tmp"))
    print(f"machine: {machine()}; {versions()}")
    print(f"checkpoints written to {base} ({filesystem(base)}); restores "
          f"{'from the page cache' if args.warm else 'with the files dropped from the page cache'}; "
          f"medians of {args.repeats} rounds after a warm-up")
    results = []
    started = time.perf_counter()
    try:
        for channels in (int(c) for c in args.channels.split(",")):
            folder = base / f"c{channels}"
            folder.mkdir()
            cmd = [sys.executable, __file__, "--child", str(channels), "--repeats", str(args.repeats),
                   "--dir", str(folder)] + (["--warm"] if args.warm else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the child for channels {channels} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            report(result)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first = results[0]["rounds"][0]
    print(f"\nnpz files: {first['npz']['files']['names']}")
    orbax = first["orbax"]["files"]
    print(f"Orbax files: {orbax['files']}, of which {orbax['json_files']} JSON; names {orbax['names']}; "
          f"starting like a pickle: {orbax['pickle_like'] or 'none'}")
    print(f"the Orbax folder during an asynchronous save: {first['orbax-async']['during_async_save']}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "versions": versions(), "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
