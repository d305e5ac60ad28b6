# The two commands a new user needs (see README.md):
#   make demo   train on the embedded MNIST digits, then sample from the model
#   make test   run the test suite
# Each creates .venv from requirements.lock the first time.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test notebooks bench venv clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: train the cpu preset into runs/default (or finish an interrupted
# run there), then draw a grid of digits into outputs/.
demo: $(STAMP)
	@if ls runs/default/checkpoints/step_* >/dev/null 2>&1; then \
		$(BIN)/python train.py --resume; \
	else \
		$(BIN)/python train.py; \
	fi
	$(BIN)/python sample.py

# Two worker processes (pytest-xdist), each test file on one of them so that a file's shared fixtures (a tiny
# trained model) are made once. Files are handed out in collection order, which tests/conftest.py starts with the
# two notebook files, the longest: one to each worker, the others filling in around them.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Re-run every notebook in full mode and store its outputs (figures) in place.
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=7200 notebooks/[0-9][0-9]_*.ipynb

# Time the train step and the samplers' forward pass against the same U-Net in
# eager PyTorch (benchmarks/bench_train.py); PyTorch is installed for this only.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs outputs
