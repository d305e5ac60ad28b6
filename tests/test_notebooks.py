"""Every notebook runs top to bottom in fast mode (DIFFUSION_FAST=1) without an error."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One scratch runs folder for all notebooks: the tiny model the first one trains serves the others."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, monkeypatch, runs_dir):
    monkeypatch.setenv("DIFFUSION_FAST", "1")
    monkeypatch.setenv("DIFFUSION_RUNS_DIR", str(runs_dir))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
