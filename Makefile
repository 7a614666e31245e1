# babelcap: every target sets up what it needs (a local virtual environment) on its own.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.babelcap-installed
# Where the demo keeps its built world and outputs (cached between runs).
DEMO_DIR ?= .cache/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: the CPU-usable CUDA build that torchvision's wheel needs.
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# Tests check babelcap's recall against CLIP_benchmark's own function; its metric module needs
	# only torch and tqdm, while its declared dependencies bring pycocoevalcap's Java jars.
	$(PY) -m pip install -q --no-deps -c constraints.txt clip-benchmark
	touch $(STAMP)

# The world models build in the background, in parallel, while tests that need none run; the
# test files run on one pytest-xdist worker per core, whole files in the suite's order.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
test: $(STAMP)
	$(PY) -m pytest -q --build-world-models -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder --durations=20

demo: $(STAMP)
	$(VENV)/bin/babelcap demo --dir $(DEMO_DIR)

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf .cache .pytest_cache .ruff_cache
