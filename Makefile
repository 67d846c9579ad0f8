# Two commands do everything (see README): `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The JPEG copy of CIFAR-10 beside the project, when there is one; otherwise ./data (downloaded).
DATA   ?= $(if $(wildcard ../shared/data/cifar10-jpg-train.tar.gz),../shared/data,data)

.PHONY: train test setup setup-dev clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/activate
	$(BIN)/pip install --quiet -e .

setup-dev: $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[dev]"

train: setup
	$(BIN)/convmixer train --data-dir $(DATA) $(ARGS)

test: setup-dev
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
