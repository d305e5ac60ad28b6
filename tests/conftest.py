"""Shared test plumbing: tables that a test wants shown in the output of every run, pass or fail, and helpers."""

import os
import pathlib
import signal

import jax
import nbformat
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))

@pytest.fixture
def report(request):
    """``report(title, text)``: print ``text`` under ``title`` in pytest's summary at the end of the run. Kept
    with the test's result (``user_properties``), which pytest-xdist's workers send back to the main process."""
    return lambda title, text: request.node.user_properties.append(("report", (title, text)))


def pytest_terminal_summary(terminalreporter):
    for results in terminalreporter.stats.values():
        for result in results:
            if getattr(result, "when", None) != "call":
                continue
            for key, value in result.user_properties:
                if key == "report":
                    terminalreporter.write_sep("-", value[0])
                    terminalreporter.write_line(value[1])


# The longest test modules, by minutes: the notebooks' fast runs. make test (--no-loadscope-reorder) hands test
# modules to its two workers in collection order, so these go first, one to each worker, and the short modules
# fill in around them instead of leaving one worker to run a notebook module alone at the end.
LONGEST_FIRST = ("test_notebooks_later", "test_notebooks")


def pytest_collection_modifyitems(items):
    """Put the modules of ``LONGEST_FIRST`` at the front of the collection, in that order (a stable sort)."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def leaves_equal(a, b):
    """Whether two pytrees hold the same arrays, bit for bit."""
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def ctrl_c_at(stop: int):
    """A training callback that sends this process a real SIGINT (Ctrl-C) after step ``stop``."""

    def callback(step, metrics):
        if step == stop:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


def randomized(model, seed=1):
    """A copy of model with every parameter perturbed (by NumPy, which needs no compiling).

    A fresh model has its residual branches and output convolution at zero, so
    it predicts 0 whatever its inputs; these tests need it to depend on them.
    """
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), state))


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
    """Share compiled train steps between the runs of a test module (they compile to the same program); a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("shared_compilation_cache")``.

    JAX decides once per process whether to use its persistent cache, so the
    decision is reset here, and again afterwards.
    """
    settings = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def run_notebook(tmp_path_factory):
    """``run_notebook(path)``: run a notebook top to bottom in fast mode (DIFFUSION_FAST=1); fails on any error.

    The notebooks of one test module share a scratch runs folder (the tiny
    model the first one trains serves the others), a scratch data cache, and a JAX compilation cache
    (their kernels compile many of the same programs). The notebooks are split
    over two modules so that pytest-xdist's workers share them out.
    """
    environment = {
        "DIFFUSION_FAST": "1",
        "DIFFUSION_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
        "DIFFUSION_DATA_DIR": str(tmp_path_factory.mktemp("data")),  # (a folder's decoded images: notebook 15)
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def run(path):
        notebook = nbformat.read(path, as_version=4)
        with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this environment
            for name, value in environment.items():
                patch.setenv(name, value)
            client = NotebookClient(
                notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
            )
            client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
        errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors

    return run
