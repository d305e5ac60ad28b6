"""The course's notebooks 01-08 run top to bottom in fast mode (DIFFUSION_FAST=1) without an error; 09 on are in
test_notebooks_later.py, so that the two test workers share the notebooks out."""

import pytest

from conftest import NOTEBOOKS

CORE = [path for path in NOTEBOOKS if int(path.name[:2]) <= 8]


def test_there_are_notebooks_in_both_modules():
    assert CORE, "no notebooks 01-08 found in notebooks/"
    assert len(CORE) < len(NOTEBOOKS), "no notebooks from 09 on found in notebooks/ (test_notebooks_later.py runs them)"


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, run_notebook):
    run_notebook(path)
