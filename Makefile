# The two commands of the README's quickstart: `make demo` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check lint typecheck bench torture clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cloud]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hwsim.demo

# pytest exits 5 when it collected no test: that is a failure here, as any non-zero.
test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check edge sync cloud hardware-sim tests bench
	$(VENV)/bin/ruff format --check edge sync cloud hardware-sim tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck

bench: $(STAMP)
	$(PY) bench/engine.py

# N kill -9 cycles of the daemon and N power cuts, then the per-event sweeps; prints the
# tally as JSON, exits 1 on any invariant violation. `make torture N=5000 SEED=7`.
N ?= 1000
SEED ?= 1
torture: $(STAMP)
	$(PY) -m hwsim.torture --kills $(N) --cuts $(N) --seed $(SEED) --sweeps

clean:
	rm -rf $(VENV) build dist *.egg-info
