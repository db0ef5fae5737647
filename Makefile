# make test : set up .venv (cached per pyproject.toml) and run the whole test suite
# make test-fast : tests/ only (unit, parity, property and short in-process training runs),
#                  without the `axolotl train` subprocess runs of integration_tests/
# make test-latest : the same suite on the newest Axolotl (0.21.0, Python 3.13), in the Debian
#                    trixie root of scripts/latest-env.sh (built and cached on first use; needs root)
# make test-newest : tests/ without Axolotl, on the newest transformers, TRL and peft releases
#                    (.venv-newest, scripts/setup_venv.sh newest)
# make test-llamafactory : the LLaMA-Factory tests (llamafactory_tests/) on LLaMA-Factory 0.9.5, Python 3.11,
#                         in the environment of scripts/llamafactory-env.sh (built and cached on first use)
# make demo : set up .venv, make the SmolLM2-135M-Instruct folder (once, offline from any model hub)
#             and train it with Q-Tuning: `axolotl train examples/smollm2-135m-qtuning.yml` (CPU)
# make mutation : plant the bugs of scripts/mutants.toml one at a time; every one must be caught
#
# Every suite runs on WORKERS processes (pytest-xdist, default 2), each test file whole on one of
# them (its module fixtures, such as a shared `axolotl train` run, are made once), the files in
# the order named (the long end-to-end ones first), and prints its 25 slowest tests. Tests marked
# `env_independent` run in `make test` only. With CI=true a test that skips for want of a
# package its environment is meant to have (QTUNING_ENV_PACKAGES below) fails instead.
.PHONY: setup test test-latest test-newest test-llamafactory test-fast demo bench mutation

export HF_HUB_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
# `axolotl train` starts `accelerate launch` from PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

WORKERS ?= 2
PYTEST := python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=25
# One compute thread per worker: WORKERS of them share the cores (torch would start one per core
# in each, and they would spin against each other). `accelerate launch` runs on one thread anyway.
test test-fast test-latest test-newest test-llamafactory: export OMP_NUM_THREADS := 1
# What each environment is meant to have, of the packages that tests skip without.
AXOLOTL_PACKAGES := axolotl deepspeed triton liger_kernel bitsandbytes matplotlib
NEWEST_PACKAGES := deepspeed bitsandbytes matplotlib
LLAMAFACTORY_PACKAGES := llamafactory matplotlib

setup:
	bash scripts/setup_venv.sh

# QTUNING_REAL_SMOKE: the quality benchmark's real-model smoke test runs in this environment only.
test: setup
	QTUNING_REAL_SMOKE=1 QTUNING_ENV_PACKAGES="$(AXOLOTL_PACKAGES)" .venv/bin/$(PYTEST) integration_tests tests

test-latest:
	QTUNING_ENV_PACKAGES="$(AXOLOTL_PACKAGES)" bash scripts/latest-env.sh run $(PYTEST) -m "not env_independent" integration_tests tests

test-newest:
	bash scripts/setup_venv.sh newest
	QTUNING_ENV_PACKAGES="$(NEWEST_PACKAGES)" .venv-newest/bin/$(PYTEST) -m "not axolotl and not env_independent" tests

test-llamafactory:
	QTUNING_ENV_PACKAGES="$(LLAMAFACTORY_PACKAGES)" bash scripts/llamafactory-env.sh run $(PYTEST) llamafactory_tests

test-fast: setup
	QTUNING_ENV_PACKAGES="$(AXOLOTL_PACKAGES)" .venv/bin/$(PYTEST) tests

DEMO_OUT := outputs/smollm2-135m-qtuning

demo: setup
	.venv/bin/qtuning-fetch-smollm2 examples/smollm2-135m-instruct
	.venv/bin/axolotl train examples/smollm2-135m-qtuning.yml
	@echo
	@echo "demo: the EU plane of the trained samples:  $(CURDIR)/$(DEMO_OUT)/qtuning_eu_plane.png"
	@echo "demo: the quadrants of each optimizer step: $(CURDIR)/$(DEMO_OUT)/qtuning_quadrant_fractions.png"
	@echo "demo: the LoRA adapter: $(CURDIR)/$(DEMO_OUT)/adapter_model.safetensors"

mutation: setup
	QTUNING_REAL_SMOKE=1 .venv/bin/python scripts/mutation.py

bench: setup
	.venv/bin/python benchmarks/ops_bench.py
	.venv/bin/python benchmarks/step_cost.py

# make gpu-check : on a CUDA machine, install the wheels in .whl/ (scripts/gpu_wheels.sh) and run
# the GPU check, STAGES="parity step qlora" by default, within BUDGET_S seconds if set
# (benchmarks/gpu/README.md)
.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(if $(BUDGET_S),--budget-s $(BUDGET_S)) $(STAGES)
