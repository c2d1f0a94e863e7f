# Targets shared by people and CI. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test,lint]'
	touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## create .venv and install the project with its test and lint extras

.PHONY: test
test: $(STAMP) ## run the test suite
	@# pytest exits 5 when it collected nothing: a broken suite, never a pass
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

.PHONY: demo
demo: $(STAMP) ## the whole pipeline on embedded Kafka + Redis: live emotions and alerts (Ctrl-C stops)
	$(VENV)/bin/cfnesa demo

.PHONY: bench
bench: $(STAMP) ## run the benchmarks (~20 min; figures printed and written to benchmarks/results/)
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/hot_path.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/gateway.py
	$(PY) benchmarks/scaleout.py

.PHONY: contract
contract: $(STAMP) ## check that docs/schemas and docs/asyncapi.yaml match the code
	$(PY) -m streaming.schemas --check
	$(PY) -m streaming.asyncapi --check

.PHONY: lint
lint: $(STAMP) ## ruff (format check + lint) and mypy
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

.PHONY: format
format: $(STAMP) ## format the code with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: clean
clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
