"""Shared test plumbing: tables that a test wants shown in the output of every run, pass or fail, and helpers."""

import jax
import numpy as np
import pytest
from flax import nnx

_REPORTS = []


@pytest.fixture
def report():
    """``report(title, text)``: print ``text`` under ``title`` in pytest's summary at the end of the run."""
    return lambda title, text: _REPORTS.append((title, text))


def pytest_terminal_summary(terminalreporter):
    for title, text in _REPORTS:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)


def randomized(model, seed=1):
    """A copy of model with every parameter perturbed (by NumPy, which needs no compiling).

    A fresh model has its residual branches and output convolution at zero, so
    it predicts 0 whatever its inputs; these tests need it to depend on them.
    """
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), state))
