# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both build .venv with Python 3.11, install torch first (the CPU wheel), then the rest.
PYTHON ?= python3.11
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepwise run recipes/tiny/skywork_dapo_arith.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=40

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow and not slurm"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
