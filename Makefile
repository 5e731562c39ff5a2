# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install install-dev fleet protos clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,dev,build,quantizer]'

# The real fleet, built once into the user cache dir (a no-op when up to date).
fleet: install-dev
	$(BIN)/mirador fleet build --quiet

# Build the fleet (once), start the mesh on the embedded default config, send sample requests, stop it.
demo: fleet
	PATH="$(abspath $(BIN)):$$PATH" ./scripts/demo.sh

test: install-dev fleet
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest -q

# Run every benchmark in bench/ and write bench/results/report.md (tables, PNG plots, machine and
# versions); long on a 2-core machine. Options through BENCH, e.g. `make bench BENCH=--quick`.
bench: fleet
	$(BIN)/pip install --quiet -e '.[cpu,dev,build,quantizer,bench]'
	$(BIN)/mirador bench report $(BENCH)

# Regenerate the Python stubs after editing protos/.
protos: install-dev
	$(BIN)/python protos/generate_python.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
