# `make demo` sets up the venv and runs the showcase; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

# Keep compiled kernels inside the checkout so runs never touch ~/.cache.
LAZYMAT_CACHE_DIR ?= $(CURDIR)/.cache/lazymat
export LAZYMAT_CACHE_DIR

.PHONY: test test-slow test-gpu demo bench gallery docs docs-full clean

$(VENV): $(STAMP)

# torch is pinned for development/CI only; the package itself accepts torch>=2.0.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

# Two or more workers (pytest-xdist): the suite is mostly kernel compiles, which run in parallel;
# the kernel cache is safe for concurrent processes.
test: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" -n auto --durations=20 tests

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow tests

# GPU tests (they skip without a CUDA GPU, torch with CUDA and `pip install .[cuda]`);
# benchmarks/gpu_check.sh runs them with the machine's own python, then the GPU benchmarks.
test-gpu: $(STAMP)
	$(VPY) -m pytest -q -m gpu tests

demo: $(STAMP)
	$(VPY) examples/demo.py

bench: $(STAMP)
	$(VPY) -m benchmarks

# Every examples/plot_*.py at full size; pictures and tables in examples/output/
# (LAZYMAT_GALLERY_OUTPUT to change it), then every table in benchmarks/results/gallery.md.
# LAZYMAT_GALLERY_SIZE=small is what make test runs.
gallery: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[gallery]'
	@set -e; for f in examples/plot_*.py; do echo "== $$f"; $(VPY) $$f; done
	$(VPY) examples/_gallery.py benchmarks/results/gallery.md

# The docs (docs/, Sphinx): `make docs` builds docs/_build/html without running the gallery
# (fast; warnings are errors, internal references checked); `make docs-full` runs the
# gallery scripts too (LAZYMAT_GALLERY_SIZE=small|full, full by default) for their figures.
SPHINX := $(VPY) -m sphinx -W --keep-going -n -b html
docs: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[docs]'
	$(SPHINX) -D plot_gallery=0 docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

docs-full: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[docs,gallery]'
	$(SPHINX) -D plot_gallery=1 docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) .cache build dist docs/_build docs/auto_examples src/*.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
