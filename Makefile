# The two commands a new user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-model test lint format unit integration e2e compose-test bench mutation clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "This project needs Python 3.11 or newer; found " + sys.version.split()[0] + ".")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[model,dev]"
	touch $(STAMP)

# The ready line counts from here, install included: what the user waits for.
demo:
	@mkdir -p .cache && date +%s > .cache/demo-began-at
	@$(MAKE) --no-print-directory venv
	$(PY) -m devstack.demo --began-at $$(cat .cache/demo-began-at)

demo-model: venv
	$(PY) -m roi_model.cli demo-model --out models/demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: venv
	$(PY) -m pytest -q tests/unit

integration: venv
	$(PY) -m pytest -q tests/integration

e2e: venv
	$(PY) -m pytest -q tests/e2e

test: lint
	$(PY) -m pytest -q tests

# The deployment for real (README, Deployment): a Docker engine with Compose v2 (installed and started by
# tests/compose/engine.sh when missing; needs root), stand-in base images where no registry answers, then
# the whole stack built and brought up with the CPU worker variant, driven through Label Studio's API, and
# its faults. Prints the time and disk it took.
compose-test: venv
	@began=$$(date +%s); tests/compose/engine.sh; \
	ROI_COMPOSE_FULL=1 ROI_REQUIRE_DOCKER=1 $(PY) -m pytest -q -s tests/compose; rc=$$?; \
	echo "compose-test: $$(( $$(date +%s) - began )) s; docker disk:"; docker system df; exit $$rc

# Run as modules (python -m benchmarks.x): benchmarks/queue.py would shadow the standard library's queue.
bench: venv
	@for b in benchmarks/*.py; do echo "# $$b"; $(PY) -m benchmarks.$$(basename $$b .py); done

# The mutation score of the modules that guard security and data (README, "Mutation testing"); not part of
# make test: it runs the fast unit tests of [tool.mutmut] once per mutant, which takes hours on two cores.
# Whole modules, and the functions of the larger ones that hold the export counts, the gate and the
# registry pointer. `make mutation MUTATION_TARGETS='backend.url_policy.*'` runs a part; results are kept
# in mutants/ between runs (a changed function or test is run again).
MUTATION_TARGETS ?= \
	'worker.failures.*' 'backend.url_policy.*' 'backend.images.*' 'roi_contract.images.*' \
	'backend.labeling.*' 'backend.regions.*' 'backend.predictions.*' 'worker.jobs.*' \
	'backend.export.x_select_annotations__*' 'backend.export.x_images_needed__*' \
	'backend.export.x_convert_tasks__*' 'backend.export.xǁ_Tallyǁ*' 'backend.export.x_check_report__*' \
	'worker.finetune.x_gate__*' 'worker.finetune.x__kind_drop__*' 'worker.finetune.x__kinds_summary__*' \
	'worker.finetune.xǁGateThresholdsǁ*' \
	'worker.registry.xǁModelRegistryǁcurrent__*' 'worker.registry.xǁModelRegistryǁpath__*' \
	'worker.registry.xǁModelRegistryǁpromote__*' 'worker.registry.xǁModelRegistryǁrollback__*' \
	'worker.registry.xǁModelRegistryǁ_set_current__*' 'worker.registry.xǁModelRegistryǁ_promotion_stack__*' \
	'worker.registry.x__checked_name__*' 'worker.registry.x__write_atomically__*'

mutation: venv
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children 2 $(MUTATION_TARGETS)
	$(PY) -m tests.mutation_score --minimum 90 $(MUTATION_TARGETS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
