# Distributed-DCGAN through CLAP: a table of contents. Every recipe calls one script.
# Settings: vars.sh (defaults), .env (yours), or the command line: make run EPOCHS=5

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv#            where the Python environment lives: make deps VENV=/opt/venv
PYTHON ?= python3#        the Python that makes the venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
LOCAL_STAMP := $(VENV)/.stamp-local
CLAP_SOURCE := $(or $(CLAP),CLAP)/app/cli/modules/node.py
PYTEST_ARGS ?=#           e.g. make test PYTEST_ARGS='-k role -x'
PYTEST_WORKERS ?= 3#      tests at once (pytest-xdist), each on its own subnets; 0: one at a time
RUN ?=#                   the fetched run `make report` reads (default: the newest)

##@ The experiment
.PHONY: all
all: $(STAMP) ## up, setup, run, results, then down (nodes are kept if a step fails)
	$(PY) scripts/all.py

.PHONY: check
check: $(STAMP) ## check settings, files and credentials before anything starts
	$(PY) scripts/check.py

.PHONY: up
up: $(STAMP) ## start NODES nodes and record them in nodes.json
	$(PY) scripts/up.py

.PHONY: setup
setup: $(STAMP) ## play the dcgan role's setup on every node
	$(PY) scripts/setup.py

.PHONY: run
run: $(STAMP) ## train EPOCHS epochs, one rank per node (re-attaches to a run still going)
	$(PY) scripts/run.py

.PHONY: results
results: $(STAMP) ## copy every run not fetched yet to RESULTS_DIR/<run_id>/ (RUN_ID=<id>: that run only)
	$(PY) scripts/results.py

.PHONY: down
down: $(STAMP) ## stop every node and clear nodes.json
	$(PY) scripts/down.py

.PHONY: status
status: $(STAMP) ## nodes, steps and runs at a glance (no Ansible)
	$(PY) scripts/status.py

.PHONY: logs
logs: $(STAMP) ## last lines of every rank's output in the newest run (RANK=n for one)
	$(PY) scripts/logs.py

.PHONY: report
report: $(STAMP) ## summary.json, summary.md and report.png of a fetched run (RUN=results/<run_id>, default the newest)
	$(PY) scripts/report.py $(RUN)

.PHONY: sweep
sweep: $(STAMP) ## one run per size of SIZES (and type of INSTANCE_TYPES) into RESULTS_DIR/sweep-<id>/, then down (SAMPLE_ITERATIONS=K: predicted from a sample)
	$(PY) scripts/sweep.py

##@ Development
.PHONY: deps
deps: $(STAMP) ## make the venv with the pinned requirements (only when they change; torch comes on first local use)

# --no-compile: of its 9,000 modules a step imports a few hundred, compiled on first import (a third
# of pip's time saved). torch, below, is compiled at install, with what a rank imports beside it
# (scripts/demo_torch.py): every rank imports most of it at once.
$(STAMP): requirements.txt requirements-collections.txt requirements-dev.txt | $(CLAP_SOURCE)
	$(PY) -c '' 2>/dev/null || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt -r requirements-dev.txt
	$(PY) scripts/role_collections.py requirements-collections.txt
	touch $@

# An empty CLAP submodule is filled on every make until it is; a CLAP= checkout is left as it is.
$(CLAP_SOURCE):
	@$(PYTHON) scripts/clap_source.py fill

# torch, for the local demo and the tests only: the local steps install it on first use as well.
$(LOCAL_STAMP): requirements-local.txt | $(STAMP)
	$(PY) scripts/demo_torch.py requirements-local.txt
	touch $@

.PHONY: test
test: export CLAP := $(or $(CLAP),$(shell $(PYTHON) scripts/clap_source.py for-tests))
# The tests start thousands of Pythons: each module is compiled once, by the first that imports it.
test: export PYTHONDONTWRITEBYTECODE :=
test: $(STAMP) $(LOCAL_STAMP) lint ## lint, then every test (CLAP: yours, the submodule, or the pinned archive in ../shared)
	$(PY) -m pytest --numprocesses $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff, yamllint and ansible-lint (production profile)
	$(PY) scripts/lint.py

.PHONY: bench
bench: $(STAMP) ## time every step and its floor for 2, 4, 8 and 16 local nodes into bench/results.md (root)
	$(PY) scripts/bench.py

.PHONY: clean
clean: ## remove the venv, .cluster and caches, never results (refuses while nodes.json lists nodes)
	$(PYTHON) scripts/clean.py $(VENV)

.PHONY: help
help: ## this list
	@awk 'BEGIN {FS = ":.*## "} /^##@/ {printf "\n%s\n", substr($$0, 5)} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@printf '\nSettings (defaults in vars.sh; override in .env or as make NAME=value):\n'
	@sed -n 's/^\([A-Z_]*\)=\([^ ]*\) *# */  \1=\2\t/p' vars.sh | expand -t 36
