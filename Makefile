# Set-up and the everyday commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk on our machines; any other spec may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DATA ?= data/shapes
PYTEST_ARGS ?=

.PHONY: venv demo test bench lint clean

$(BIN)/mmpt: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/mmpt

venv: $(BIN)/mmpt

$(DATA)/tokenizer.json: | venv
	$(BIN)/mmpt data synth --out $(DATA) --samples 6000 --shards 12 --eval-samples 512

demo: venv $(DATA)/tokenizer.json
	$(BIN)/mmpt run jobs/configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: venv $(DATA)/tokenizer.json
	$(BIN)/python -m benchmarks.data_wait
	$(BIN)/python -m benchmarks.data
	$(BIN)/python -m benchmarks.moe
	$(BIN)/python -m benchmarks.models
	$(BIN)/python -m benchmarks.overhead

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf runs .mmpt .pytest_cache
