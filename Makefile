# Secure Your Server: set-up and everyday commands.
#   make run    serve the site on http://$(HOST):$(PORT)/
#   make test   install everything the tests need and run them
# `make help` lists every target.

PYTHON      ?= python3
VENV        ?= .venv
HOST        ?= 127.0.0.1
PORT        ?= 8000
PYTEST_ARGS ?=

VENV_PYTHON := $(VENV)/bin/python
VENV_PIP    := $(VENV)/bin/pip
PIP_INSTALL := $(VENV_PIP) install --disable-pip-version-check
# Stamps: (re)install only when pyproject.toml is newer than the last install.
RUN_STAMP   := $(VENV)/.installed-run.stamp
TEST_STAMP  := $(VENV)/.installed-test.stamp
LINT_STAMP  := $(VENV)/.installed-lint.stamp

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

.PHONY: help run test lint bench bench-abuse bench-pages bench-retention bench-instances mutation venv install install-test install-lint debian-packages clean distclean

help: ## List the targets
	@echo "Usage: make TARGET [HOST=$(HOST)] [PORT=$(PORT)] [PYTEST_ARGS='...'] [PYTHON=$(PYTHON)]"
	@echo
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

run: install | var ## Serve the site on HOST:PORT (creates .venv and ./var if needed)
	$(VENV)/bin/pybabel compile -d locales
	$(VENV)/bin/secure-your-server serve --host $(HOST) --port $(PORT)

test: install-test | var ## Install test deps and Debian packages, then run pytest (PYTEST_ARGS='...')
	bash scripts/install-debian-packages.sh
	bash scripts/install-mta.sh
	$(VENV)/bin/pybabel compile -d locales
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm is missing: the accessibility tests need axe-core from the npm registry (install Node.js)"; fi
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

lint: install-lint ## ruff, mypy --strict and function sizes over app/ (pyproject.toml); all must report nothing
	$(VENV)/bin/ruff check app
	$(VENV)/bin/mypy
	$(VENV_PYTHON) scripts/function_sizes.py --check

bench: install-test ## Benchmarks against real servers, with nmap as the baseline (as root)
	bash scripts/install-debian-packages.sh
	$(VENV_PYTHON) bench/relay.py
	$(VENV_PYTHON) bench/proxy.py
	$(VENV_PYTHON) bench/abuse.py
	$(VENV_PYTHON) bench/evidence.py

bench-abuse: install-test ## The most traffic one address can get through the site per hour, beside the README's bounds
	$(VENV_PYTHON) bench/abuse.py

bench-pages: install-test ## Requests/s of an audit's JSON, its page, / and a guide, beside a minimal FastAPI app (needs ab)
	$(VENV_PYTHON) bench/pages.py

bench-retention: install-test ## The retention purge on 10,000 and 100,000 expired audits, beside the old single statement
	$(VENV_PYTHON) bench/retention.py

bench-instances: install-test ## Pages/s and audits/min of one web process beside two (serve --workers; needs ab)
	$(VENV_PYTHON) bench/instances.py

mutation: install-test ## Mutation score of the trust-critical modules (mutmut; about 8 min on 2 cores)
	$(PIP_INSTALL) -e '.[test,mutation]'
	$(VENV_PYTHON) scripts/mutation.py

venv: $(VENV_PYTHON) ## Create the virtualenv .venv

install: $(RUN_STAMP) ## pip install -e . into .venv (when pyproject.toml changed)

install-test: $(TEST_STAMP) ## pip install -e '.[test]' into .venv (when pyproject.toml changed)

install-lint: $(LINT_STAMP) ## pip install -e '.[lint]' into .venv (when pyproject.toml changed)

debian-packages: ## Install the Debian packages the tests need (as root; see scripts/debian-packages.txt)
	bash scripts/install-debian-packages.sh

clean: ## Remove caches and build leftovers (keeps .venv and ./var)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	rm -rf .pytest_cache build dist *.egg-info mutants

distclean: clean ## Also remove .venv (./var, the site's data, is kept)
	rm -rf $(VENV)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(PIP_INSTALL) -e .
	touch $@

# The test extra includes the project itself, so it also satisfies `install`.
$(TEST_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(RUN_STAMP)

$(LINT_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(PIP_INSTALL) -e '.[lint]'
	touch $@

var:
	mkdir -p $@
