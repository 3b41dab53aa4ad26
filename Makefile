# The two commands of the README's quickstart: `make demo` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check lint typecheck bench torture clean package bundle package-onefile release-key

# The frozen terminal binary (PyInstaller onedir, see README "Frozen binary"): rebuilt
# only when a file it is made of changed, so `make test` builds it at most once.
BINARY := dist/tillflow-edge/tillflow-edge
BINARY_SOURCES := pyproject.toml $(shell find edge sync packaging -name '*.py' -o -name '*.yaml' -o -name '*.sql' -o -name '*.spec' 2>/dev/null)
PYINSTALLER := $(PY) -m PyInstaller --noconfirm --log-level WARN --workpath build/pyinstaller
# The release signing key for `make bundle` (make one with `make release-key`).
RELEASE_KEY ?= $(HOME)/.tillflow/release.key

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cloud,build]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hwsim.demo

# pytest exits 5 when it collected no test: that is a failure here, as any non-zero.
# The packaging tests run against the frozen binary, so it is built first.
test: $(STAMP) $(BINARY)
	$(PY) -m pytest -q

$(BINARY): $(STAMP) $(BINARY_SOURCES)
	$(PYINSTALLER) --distpath dist packaging/tillflow-edge.spec
	@$(PY) packaging/release_tool.py report

package: $(BINARY)

# For comparison only (bench/footprint.py measures it when present): what ships is onedir.
package-onefile: $(STAMP)
	TILLFLOW_PACKAGE_MODE=onefile $(PYINSTALLER) --distpath dist/onefile packaging/tillflow-edge.spec
	@ls -l dist/onefile/tillflow-edge && sha256sum dist/onefile/tillflow-edge

bundle: $(BINARY)
	@test -f $(RELEASE_KEY) || { echo "no release key $(RELEASE_KEY): make release-key, or RELEASE_KEY=FILE"; exit 1; }
	$(PY) packaging/release_tool.py bundle --key $(RELEASE_KEY)

release-key: $(STAMP)
	$(PY) packaging/release_tool.py keygen --out-dir $(dir $(RELEASE_KEY))

lint: $(STAMP)
	$(VENV)/bin/ruff check edge sync cloud hardware-sim tests bench packaging
	$(VENV)/bin/ruff format --check edge sync cloud hardware-sim tests bench packaging

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
