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

ARGS ?=
PYTEST_ARGS ?=

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

# torch is pinned in pyproject.toml and installed first: any other spec pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

# lmplz and build_binary come from the kenlm sdist (the PyPI wheel only queries models).
$(KENLM_BIN)/lmplz: | system-deps $(VENV)/.installed
	rm -rf .cache/kenlm-build && mkdir -p .cache/kenlm-build $(KENLM_BIN)
	$(PY) -m pip download -q --no-binary kenlm --no-deps kenlm==$(KENLM_VERSION) -d .cache/kenlm-build
	tar -xzf .cache/kenlm-build/kenlm-$(KENLM_VERSION).tar.gz -C .cache/kenlm-build
	cmake -S .cache/kenlm-build/kenlm-$(KENLM_VERSION) -B .cache/kenlm-build/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(MAKE) -C .cache/kenlm-build/build -j2 lmplz build_binary >/dev/null
	cp .cache/kenlm-build/build/bin/lmplz .cache/kenlm-build/build/bin/build_binary $(KENLM_BIN)/

clean:
	rm -rf artifacts .cache/kenlm-build
