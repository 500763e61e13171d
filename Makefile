# Two commands for a fresh machine: `make distill` (the offline demo) and `make test`.
# Both create .venv and install hf-pds into it first. torch is pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

EMOJI := .cache/emoji/node_modules/emoji-datasource-google/emoji.json

.PHONY: install distill test lint benchmark-emoji

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

# The emoji images of the offline evaluation benchmark ship in npm packages.
$(EMOJI):
	npm install --prefix .cache/emoji --no-audit --no-fund emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0

test: lint $(EMOJI)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

benchmark-emoji: $(INSTALLED) $(EMOJI)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/emoji.py
