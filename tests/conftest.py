"""Shared test plumbing: tables that a test wants shown in the output of every run, pass or fail, and helpers."""

import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

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
