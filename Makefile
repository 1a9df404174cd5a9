# s3-sysbackup: everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `sam build` looks for the runtime's interpreter (python3.12) on PATH; pyenv provides it here.
SAM_ENV := PYENV_VERSION=$(shell pyenv versions --bare 2>/dev/null | grep -E '^3\.(12|11|13)\.' | tr '\n' ':' | sed 's/:$$//')
PYTEST_ARGS ?=

.PHONY: install demo test unit integration lint template bench bench-compare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The template: cfn-lint, sam validate --lint, and a real sam build of every function and the layer.
template: install
	$(BIN)/cfn-lint template.yaml
	$(SAM_ENV) $(BIN)/sam validate --lint --template template.yaml --region us-east-1
	$(SAM_ENV) $(BIN)/sam build --template template.yaml --build-dir .aws-sam/build

unit: install
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

test: install lint template
	$(BIN)/pytest -q tests $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py

# s3-sysbackup and restic side by side on one local stack (installs restic with apt-get if missing).
BENCH_ARGS ?=
bench-compare: install
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

clean:
	rm -rf .aws-sam .pytest_cache .ruff_cache
