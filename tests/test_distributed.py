"""Several processes: two processes on this CPU, joined by ``jax.distributed`` (gloo collectives), train the tiny
preset data-parallel to the parameters of one process on the same global batches; only process 0 writes the run
folder; the two resume from its checkpoints. Then the checks of the flags that launch them.

Each process has one CPU device, so the two-process mesh has two devices, each taking half of every batch; its
gradient all-reduce crosses the processes. The two-device test of one process is ``test_training``'s.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import leaves_equal
from diffusion import checkpoint, cli, configs, runs, training
from diffusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# One process of a run: train as the command line says (train.py's flags), then save the final parameters and what
# this process wrote into the run folder (every file opened for writing, made, renamed or removed there).
PROCESS = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    out, *argv = sys.argv[1:]
    runs_dir = os.path.realpath(argv[argv.index("--runs-dir") + 1])
    writes = []
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (args[2] or 0) & WRITE:
            paths = args[:1]
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if os.path.realpath(os.fsdecode(path)).startswith(runs_dir + os.sep):
                writes.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(audit)
    import jax
    from diffusion import cli, training
    state = training.train(cli.config_from_flags(argv))
    np.savez(out + ".npz", *jax.tree.leaves(training.to_host(state.params)))
    with open(out + ".json", "w") as f:
        json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "writes": writes}, f)
    """
)

# The run: 6 steps, checkpoints at 3 and 6, a sample grid at each, a metrics line every step.
FLAGS = ["--preset", "tiny", "--steps", "6", "--warmup-steps", "2", "--checkpoint-every", "3", "--sample-every", "3",
         "--log-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(outputs: Path, flags: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """Start ``flags`` as the ``processes`` processes of one run (distributed if more than one: a coordinator on a
    free local port), each with one CPU device; each writes ``outputs``/<its id>.npz and .json (``PROCESS``), its
    output into <its id>.log.

    XLA compiles without its backend optimizations: the same programs, compiled in half the time, which is where
    this test's time goes (above all process 1's, which the compilation cache would not spare: only process 0
    writes it, and the keys of process 1's programs differ).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    outputs.mkdir(parents=True)
    launch = ["--distributed", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    started = []
    for i in range(processes):
        with open(outputs / f"{i}.log", "w") as log:
            started.append(subprocess.Popen(
                [sys.executable, "-c", PROCESS, str(outputs / str(i)), *flags,
                 *(launch + ["--process-id", str(i)] if processes > 1 else [])],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            ))
    return started


@pytest.fixture
def ending():
    """``ending(processes)``: the same list of processes, killed at the end of the test if still running."""
    started = []
    yield lambda processes: started.extend(processes) or processes
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def results_of(processes: list[subprocess.Popen], outputs: Path, timeout: float = 240) -> list[dict]:
    """What each of ``start``'s processes wrote, its final parameters under "params", once all have finished;
    fails with every process's output if one fails or hangs (a collective waiting for another that died)."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.wait()
    if any(process.returncode for process in processes):
        logs = "\n".join(f"--- process {k}: exit {p.returncode}\n{(outputs / f'{k}.log').read_text()[-4000:]}"
                         for k, p in enumerate(processes))
        pytest.fail(f"a run failed or hung (> {timeout} s):\n{logs}")
    results = []
    for k in range(len(processes)):
        result = json.loads((outputs / f"{k}.json").read_text())
        with np.load(outputs / f"{k}.npz") as saved:
            result["params"] = [saved[f"arr_{n}"] for n in range(len(saved.files))]
        results.append(result)
    return results


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_processes_train_and_resume_as_one(tmp_path, ending):
    runs_dir = tmp_path / "runs"
    flags = [*FLAGS, "--runs-dir", str(runs_dir)]
    # The reference, alongside: one process, one device, the same config and global batches.
    alone = ending(start(tmp_path / "alone", [*flags, "--name", "one"], processes=1))
    first, second = results_of(ending(start(tmp_path / "two", [*flags, "--name", "two"])), tmp_path / "two")
    assert (first["processes"], first["devices"]) == (2, 2)
    assert first["writes"] and not second["writes"], second["writes"]  # process 0 writes, process 1 nothing
    assert leaves_equal(first["params"], second["params"])  # the replicas never drift apart
    assert logged_steps(runs_dir / "two") == [1, 2, 3, 4, 5, 6]  # each line written once
    # As if the run had stopped after its checkpoint at step 3: the two resume from it, each given its own id.
    last = runs.checkpoint_dir(runs_dir / "two") / checkpoint.step_name(6)
    config = cli.config_from_flags([*flags, "--name", "two"])
    template = jax.eval_shape(lambda: training.init_state(config))[1]
    trained = checkpoint.load(last, template)
    shutil.rmtree(last)
    resuming = ending(start(tmp_path / "resumed", ["--runs-dir", str(runs_dir), "--name", "two", "--resume"]))

    (one,) = results_of(alone, tmp_path / "alone")
    reference = checkpoint.load(checkpoint.latest(runs.checkpoint_dir(runs_dir / "one")), template)
    assert_close(first["params"], one["params"])
    assert_close(trained, reference)  # the parameters, EMA, optimizer state and step
    first, second = results_of(resuming, tmp_path / "resumed")
    assert first["writes"] and not second["writes"], second["writes"]
    assert leaves_equal(first["params"], second["params"])
    assert_close(first["params"], one["params"])
    assert_close(checkpoint.load(last, template), reference)
    assert files_in(runs_dir / "two") == files_in(runs_dir / "one")  # checkpoints, samples, metrics, loss curve
    assert logged_steps(runs_dir / "two") == [1, 2, 3, 4, 5, 6]


def test_a_host_conditions_its_rows_as_the_whole_batch_would():
    # A text run's captions are drawn for the whole batch, so that a row's does not depend on how many hosts share it.
    text = configs.make_config("text-tiny")
    rows = training.load_training_data(text)[1][:16]
    for config, y in ((text, rows), (configs.make_config("tiny"), rows[:, 0])):
        halves = [training.conditions(config, y, 5, part) for part in (slice(0, 8), slice(8, 16))]
        assert np.array_equal(np.concatenate(halves), training.conditions(config, y, 5))


# --- The flags that launch a process ------------------------------------------------------------------------------


def test_launch_flags():
    config = cli.config_from_flags(
        ["--preset", "tiny", "--distributed", "--coordinator", "10.0.0.1:1234", "--num-processes", "4",
         "--process-id", "3"])
    assert (config.distributed, config.coordinator, config.num_processes, config.process_id) == (
        True, "10.0.0.1:1234", 4, 3)
    assert configs.make_config("tiny", distributed=True).coordinator == ""  # on a cluster: JAX reads them there
    assert not {*configs.LAUNCH_FIELDS} & {*sum(configs.KIND_ARCHITECTURE_FIELDS.values(), ())}  # resume anywhere


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(coordinator="h:1", num_processes=2), "coordinator is for the processes of a distributed run"),
        (dict(distributed=True, coordinator="h:1"), "--num-processes N"),
        (dict(distributed=True, num_processes=2, process_id=1), "--coordinator HOST:PORT"),
        (dict(distributed=True, process_id=1), "--coordinator HOST:PORT"),
        (dict(distributed=True, coordinator="h", num_processes=2), "coordinator must be HOST:PORT"),
        (dict(distributed=True, coordinator="h:port", num_processes=2), "coordinator must be HOST:PORT"),
        (dict(distributed=True, coordinator="h:1", num_processes=2, process_id=2), r"less than num_processes \(2\)"),
        (dict(distributed=True, coordinator="h:1", num_processes=2, process_id=-1), "process_id must be a whole"),
    ],
)
def test_bad_launch_flags(overrides, message):
    with pytest.raises(ConfigError, match=message):
        configs.make_config("tiny", **overrides)


def test_a_resumed_process_is_the_one_its_command_line_says(tmp_path):
    # config.json is written by process 0: resuming must not make every host process 0 of the old coordinator.
    saved = configs.make_config("tiny", distributed=True, coordinator="10.0.0.1:1234", num_processes=2)
    checkpoint.save(runs.checkpoint_dir(tmp_path / "x"), 3, {"w": np.zeros(2)}, saved.to_dict(), {}, keep=1)
    resumed = runs.resume_config(str(tmp_path), "x", coordinator="10.0.0.2:99", num_processes=3, process_id=2)
    assert (resumed.distributed, resumed.coordinator, resumed.num_processes, resumed.process_id) == (
        True, "10.0.0.2:99", 3, 2)
    on_a_cluster = runs.resume_config(str(tmp_path), "x")  # (SLURM, Open MPI: JAX reads them from the cluster)
    assert (on_a_cluster.distributed, on_a_cluster.coordinator, on_a_cluster.num_processes) == (True, "", 0)
    assert not runs.resume_config(str(tmp_path), "x", distributed=False).distributed  # on one host


def test_no_cluster_to_join_is_a_config_error():
    # Run in a fresh process: joining starts JAX's distributed client, which a process can do only once.
    code = textwrap.dedent(
        """
        from diffusion import configs, training
        from diffusion.errors import ConfigError
        try:
            training.join_processes(configs.make_config("tiny", distributed=True))
        except ConfigError as error:
            print("ERROR", error)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert "ERROR distributed=True, but JAX found no cluster to join" in out.stdout, out.stderr[-3000:]
