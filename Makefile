# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean flower-peer

setup: $(STAMP)

# Reinstall only when the project's metadata changes; `make setup` is instant otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/consortium demo

# Both cores: one worker per core, each test file whole on one worker (its module fixtures built once).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python benchmarks/run_all.py

# Optional, in no other target: Flower 1.42 in an environment of its own (.venv-flower), the peer that
# benchmarks/bench_growth.py times beside our backends. flwr pins typer, rich, fastapi, uvicorn and ray
# below our pins, so it cannot share .venv. This project goes in without its dependencies, with only what
# the peer imports of it (our data, model and training: the pins below, read from pyproject.toml).
FLOWER        := .venv-flower
FLOWER_STAMP  := $(FLOWER)/.installed
FLOWER_OURS   := torch numpy pydantic safetensors pyyaml cryptography dp-accounting sqlalchemy rfc8785 scipy

flower-peer: $(FLOWER_STAMP)

$(FLOWER_STAMP): pyproject.toml Makefile
	@test -x $(FLOWER)/bin/python || $(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER)/bin/python -m pip install --quiet 'flwr[simulation]==1.42.0' $$($(FLOWER)/bin/python -c \
		"import tomllib; pins = {d.split('==')[0]: d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']}; \
		print(' '.join(pins[n] for n in '$(FLOWER_OURS)'.split()))")
	$(FLOWER)/bin/python -m pip install --quiet --no-deps -e .
	@touch $(FLOWER_STAMP)

clean:
	rm -rf $(VENV) $(FLOWER) runs .pytest_cache build src/*.egg-info
