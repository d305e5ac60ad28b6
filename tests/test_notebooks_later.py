"""Notebooks 09 on (prompts, latents, few steps, watermarks, LoRA, flow matching) run top to bottom in fast mode
without an error; 01-08 are in test_notebooks.py."""

import pytest

from conftest import NOTEBOOKS


@pytest.mark.parametrize("path", [path for path in NOTEBOOKS if int(path.name[:2]) > 8], ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, run_notebook):
    run_notebook(path)
