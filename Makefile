# Two commands for a fresh machine: `make distill` (the offline demo) and `make test`.
# Both create .venv and install hf-pds into it first. torch is pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install distill test lint

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(INSTALLED)

distill: $(INSTALLED)
	$(BIN)/hf-pds distill --output pds-digits-demo --overwrite

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
