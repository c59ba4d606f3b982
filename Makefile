# The two commands: `make demo` and `make test`. Both set up .venv from this repo's own files
# first; the set-up re-runs only when pyproject.toml changes (a stamp file records it).
PYTHON        ?= python3.11
VENV          := .venv
BIN           := $(VENV)/bin
STAMP         := $(VENV)/.installed
# torch is installed first, on its own, so that a CPU-only machine gets the CPU build.
# GPU hosts: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (see README).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
DEMO_PRESET   ?= small
TEST_ARGS     ?=

.PHONY: demo test lint setup browser stack-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/onerec demo --config $(DEMO_PRESET)

# The dashboard's browser test drives the system Chromium: installed with apt where this runs as
# root (CI, containers); elsewhere the script says why not and that test skips with the reason.
browser:
	@sh scripts/install-browser.sh

test: $(STAMP) browser
	$(BIN)/python -m pytest tests $(TEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --select F,E9 onerec serving components pipelines feature_repo tests benchmarks

stack-down: $(STAMP)
	$(BIN)/onerec stack down --config $(DEMO_PRESET)

clean:
	rm -rf $(VENV) .onerec .onerec-debug .pytest_cache *.egg-info
