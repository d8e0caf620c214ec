# privlm: `make demo` runs the main job on the embedded default corpus, `make test` runs the test suite.
# Both create/refresh the local virtual environment from the project's own files first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.privlm-installed
# loadgroup: the tests of one xdist_group (the SLURM tests share one cluster) run on one worker
PYTEST_ARGS ?= -q -n 2 --dist loadgroup

# SecretFlow SPU (privlm pi) needs Python 3.11, jax 0.4.34 and numpy<2: its own environment, see requirements-spu.txt
SPU_PYTHON ?= python3.11
SPU_VENV   := .venv-spu
SPU_STAMP  := $(SPU_VENV)/.privlm-spu-installed

.PHONY: setup spu-setup chromium slurm demo study-v3 test test-fast docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

spu-setup: $(SPU_STAMP)

$(SPU_STAMP): requirements-spu.txt pyproject.toml
	test -x $(SPU_VENV)/bin/python || $(SPU_PYTHON) -m venv $(SPU_VENV)
	$(SPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(SPU_VENV)/bin/python -m pip install -q -r requirements-spu.txt
	$(SPU_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(SPU_STAMP)

# the demo's directory (three run directories, results.md/json, report.html, demo.md)
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# extra flags of the demo's private next-token prediction (`privlm pi run`; default: privlm demo's --pi-args)
DEMO_PI_ARGS ?=

# Baseline vs softmax-only vs entropy-regularized on the embedded corpus (configs/sweeps/demo.yaml), one
# comparison table, one private next-token prediction under SPU, and the HTML report.
demo: setup spu-setup
	$(BIN)/privlm demo --out $(DEMO_DIR) $(if $(DEMO_PI_ARGS),--pi-args "$(DEMO_PI_ARGS)")

# CPU study v3 (docs/results/cpu-study-v3): ~9 CPU-hours estimated; resumable, rerun to continue.
study-v3: setup
	PYTHONPATH=src $(BIN)/python bench/study_v3.py --jobs 2

test: setup spu-setup chromium slurm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit and contract tests (those not marked slow, see pyproject.toml): the main environment only.
test-fast: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow"

# Rewrite the numbers of README.md and docs/results/*/README.md from the committed results files (between
# <!-- privlm:begin/end --> markers); `make docs DOCS_ARGS=--check` only checks them.
docs: setup
	$(BIN)/python -m privlm.report.readme $(DOCS_ARGS)

# Headless Chromium for the report test (tests/test_report.py opens the HTML report in it); Debian package.
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# A real single-node SLURM cluster for tests/test_slurm.py (the fixture starts munged, slurmctld and slurmd in a
# temporary directory and stops them by PID); Debian packages, as root.
slurm:
	command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
	  && command -v munged >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
	  --no-install-recommends slurmctld slurmd slurm-client munge)

clean:
	rm -rf $(VENV) $(SPU_VENV) .pytest_cache runs
