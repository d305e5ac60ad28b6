"""The course's notebooks 01-08 run top to bottom in fast mode (DIFFUSION_FAST=1) without an error; 09 on are in
test_notebooks_later.py, so that the two test workers share the notebooks out."""

import pytest

from conftest import NOTEBOOKS

CORE = [path for path in NOTEBOOKS if int(path.name[:2]) <= 8]


def test_there_are_notebooks():
    assert CORE and len(CORE) < len(NOTEBOOKS), "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, run_notebook):
    run_notebook(path)
