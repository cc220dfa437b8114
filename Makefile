# RunnerHub: `make demo` runs the whole system locally; `make test` runs every test.
# Both do all their own set-up (virtualenv, pinned packages, Docker engine, runner images).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: isolation-soak
.PHONY: help venv lint test test-unit docker images demo bench-webhook bench-pickup bench-dispatch bench-scaling-local bench-scaling replay fuzz-api chaos reconcile \
	synth clean wheelhouse wheelhouse-trainer executor-host-image browser dind-image xfsprogs

help:
	@echo "make demo | test | lint | bench-webhook | bench-pickup | bench-dispatch | chaos | reconcile | synth | clean"

$(STAMP): requirements.txt requirements-executor.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	@if ls scripts/*.sh >/dev/null 2>&1; then \
	  command -v shellcheck >/dev/null || scripts/apt-install.sh shellcheck; \
	  shellcheck scripts/*.sh runner-image/*.sh; fi

docker:
	scripts/ensure-docker.sh

images: docker
	scripts/build-runner-images.sh $(if $(POOLS),--pools $(POOLS))

# The executor's wheels for an offline install on a Debian 12 host (x86_64, CPython 3.11):
# tests/e2e/test_install_script.py runs scripts/install-executor.sh --wheelhouse with them.
WHEELHOUSE := .cache/wheelhouse-executor
$(WHEELHOUSE)/.stamp: requirements.txt requirements-executor.txt constraints.txt | $(STAMP)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  --implementation cp --python-version 3.11 --abi cp311 \
	  -d $(WHEELHOUSE) -c constraints.txt -r requirements-executor.txt
	touch $@

wheelhouse: $(WHEELHOUSE)/.stamp

# The trainer Lambda's layer wheels (requirements-trainer.txt, manylinux x86_64 cp311):
# tests/infra/test_trainer_function.py measures the package and imports it; synth builds the layer.
TRAINER_WHEELHOUSE := .cache/wheelhouse-trainer
$(TRAINER_WHEELHOUSE)/.stamp: requirements-trainer.txt constraints.txt | $(STAMP)
	rm -rf $(TRAINER_WHEELHOUSE) && mkdir -p $(TRAINER_WHEELHOUSE)
	$(PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --implementation cp --python-version 3.11 --abi cp311 \
	  -d $(TRAINER_WHEELHOUSE) -c constraints.txt -r requirements-trainer.txt
	touch $@

wheelhouse-trainer: $(TRAINER_WHEELHOUSE)/.stamp

# A Debian 12 image with the install script's Debian packages, for the same test (offline).
executor-host-image: docker
	scripts/build-executor-host-image.sh

# The `docker` profile's per-job engine image, from the one above (tests/isolation).
dind-image: executor-host-image
	scripts/build-dind-image.sh

# mkfs.xfs for tests/isolation/test_disk.py's loop-mounted xfs Docker data root.
xfsprogs:
	scripts/apt-install.sh xfsprogs

# The whole system locally: `make demo [WORKLOAD=file.json] [POOLS=pools.toml] [KEEP=1]`;
# it prints the dashboard's URL, and with KEEP=1 keeps the stack up after the summary.
demo: venv images
	$(PY) -m devstack.demo $(if $(WORKLOAD),--workload $(WORKLOAD)) $(if $(POOLS),--pools $(POOLS)) \
	  $(if $(KEEP),--keep)

# Debian's chromium and its driver: tests/e2e/test_dashboard_browser.py drives the dashboard.
browser:
	scripts/apt-install.sh chromium chromium-driver

test: venv lint docker images wheelhouse wheelhouse-trainer executor-host-image browser \
	dind-image xfsprogs
	$(PY) -m pytest tests

# The hardened job's reachability check, RUNS times (default 10; make test runs it once): it
# guards a start-up race that once let a job through (docs/security.md). Last line:
# {"runs", "leaks"}; exit 1 when any run leaked.
isolation-soak: venv docker images
	@runs=$${RUNS:-10}; leaks=0; for i in $$(seq $$runs); do \
	  CI=true $(PY) -m pytest tests/isolation/test_hardened.py -q -p no:cacheprovider \
	    -m leak_soak >/dev/null 2>&1 || leaks=$$((leaks + 1)); done; \
	echo "{\"runs\": $$runs, \"leaks\": $$leaks}"; test $$leaks -eq 0

test-unit: venv
	$(PY) -m pytest tests/unit

bench-webhook: venv
	$(PY) -m benchmarks.webhook

bench-pickup: venv images
	$(PY) -m benchmarks.pickup

bench-dispatch: venv
	$(PY) -m benchmarks.dispatch $(if $(MINUTES),--minutes $(MINUTES))

# The scaler and the local fleet through three bursts (boot delay 20 s, ~10 min; never in `make test`).
bench-scaling-local: venv images
	$(PY) -m benchmarks.scaling

# Every scaling policy on the last week of the six generated traces, in the simulator
# (forecast/, docs/scaling.md; ~15 min on 2 cores; never in `make test`). Last line: JSON.
bench-scaling: venv
	$(PY) -m benchmarks.scaling_sim

# Fuzz the management API from its OpenAPI document as admin, operator, viewer and with no token
# (benchmarks/fuzz_api.py; PER_ROLE requests each, default 1000; a few minutes; never in
# `make test`, which runs 30 a role). Last line: the JSON verdict; exit 1 when a target is missed.
fuzz-api: venv
	$(PY) -m benchmarks.fuzz_api $(if $(PER_ROLE),--requests-per-role $(PER_ROLE))

# Replay a trace (CSV: timestamp,labels,duration_s) under every policy: train on all but the
# last week, judge the last week. POOL_SLOTS: a host's slots per pool where not 4
# (RUNNERHUB_SCALER_POOL_SLOTS' format); BOOT_S: a host's boot, s. Last line: the verdict JSON
# (exit 1: a target missed; 2: bad input).
replay: venv
	@test -n "$(TRACE)" || { echo "usage: make replay TRACE=file.csv [POOLS=pools.toml] [POOL_SLOTS=gpu=1,linux-large=8] [BOOT_S=60]" >&2; exit 2; }
	$(PY) -m forecast.replay "$(TRACE)" $(if $(POOLS),--pools "$(POOLS)") $(if $(POOL_SLOTS),--pool-slots "$(POOL_SLOTS)") $(if $(BOOT_S),--boot-s "$(BOOT_S)") --workers 2

# The long fault suite: 300 jobs under every fault at once; last line is the JSON summary.
# SELFTEST=1 plants one job nothing can serve correctly: it must report lost 1 and fail.
chaos: venv images
	$(PY) -m devstack.chaos --profile long $(if $(SELFTEST),--selftest)

# One reconciler run against whatever RUNNERHUB_* and AWS_ENDPOINT_URL point at.
reconcile: venv
	$(PY) -m chalicelib.reconciler $(ARGS)

# Synthesize every stack offline (no AWS account) and lint the templates. Deployed stages take
# chalicelib/config/pools.production.example.toml unless POOLS=chalicelib/config/<file>.toml;
# a pools file they must not run (tags, the demo scope, sizes that don't fit) fails it.
synth: venv
	rm -f infra/cdk.out/*.template.json
	$(PY) infra/synth.py --outdir infra/cdk.out $(if $(POOLS),-c pools_file=$(POOLS))
	$(VENV)/bin/cfn-lint infra/cdk.out/*.template.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
