# `make run` and `make test` do all the set-up on a fresh machine; both are safe to run twice.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KENLM_VERSION := 0.3.0
KENLM_BIN := .kenlm/bin
APT_PACKAGES := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev \
	zlib1g-dev libbz2-dev liblzma-dev cmake g++ make
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export SUNLEARN_KENLM_BIN := $(CURDIR)/$(KENLM_BIN)

STEP := bash .ci/step
ARGS ?=
# two test processes, each file's tests in one of them (module fixtures are built once): most slow tests wait on
# servers and subprocesses, so two share 2 cores well (`make test PYTEST_WORKERS=0` runs them in this process).
# --no-loadscope-reorder keeps the collection order (files with slow tests first, tests/conftest.py), not xdist's
# largest-file-first, which left the one-test slow files for the end
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

.PHONY: setup run test bench serve lint clean system-deps

setup: $(VENV)/.installed $(KENLM_BIN)/lmplz

run: setup
	$(VENV)/bin/sunlearn run $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

# `make serve DB=postgres` keeps the server's database in a local PostgreSQL (Debian's package, installed if missing)
DB ?= sqlite
serve: setup
	@if [ "$(DB)" = postgres ]; then bash .ci/system-deps postgresql; fi
	$(VENV)/bin/sunlearn serve --db $(DB) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

system-deps:
	@bash .ci/system-deps $(APT_PACKAGES)

# Each set-up step prints one line with its time; its output goes to .cache/setup/<step>.log (shown on failure).
# torch is pinned in pyproject.toml and installed first: any other spec pulls a multi-GB CUDA build. constraints.txt
# pins the rest: results depend on library versions that no stage fingerprint covers.
# Bytecode is compiled once, on every core, after pip (whose own pass is serial): where PYTHONDONTWRITEBYTECODE is
# set (Docker images, this project's build machines), Python caches nothing it imports, so each process compiled torch,
# transformers and Prefect again (`import pipeline.sweep` 10.6 s, 4.1 s after). Its result is ignored: files written
# for newer Pythons (e.g. whenever's _typing_312.py) do not compile here and are never imported.
$(VENV)/.installed: pyproject.toml constraints.txt | system-deps
	@test -x $(PY) || $(STEP) venv sh -c '$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --upgrade pip'
	@$(STEP) torch $(PY) -m pip install --no-compile torch==2.13.0
	@$(STEP) packages $(PY) -m pip install --no-compile -c constraints.txt -e '.[dev]'
	@$(STEP) bytecode $(PY) -c 'import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)' $(VENV)/lib
	@touch $@

$(KENLM_BIN)/lmplz: | system-deps $(VENV)/.installed
	@$(STEP) kenlm bash .ci/build-kenlm $(KENLM_VERSION) $(PY) $(KENLM_BIN)

clean:
	rm -rf artifacts .cache/kenlm-build
