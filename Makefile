# Two commands for a fresh machine (Python >= 3.10, pip, make):
#   make demo   build .venv, install the toolkit, run the demo on the built-in tiny-reasoner
#   make test   build .venv, install the toolkit with its test extras, run the test suite
#   make test-fast  the edit loop: the suite without the tests marked `slow` (kill -9 loops,
#               torchrun, the headless browser, the wheel, CLI runs in subprocesses, multi-stage
#               end-to-end runs), on every core (pytest-xdist); docs/development.md#test-tiers
#   make lint   the house checks: ruff, the import-linter contracts and mypy (pyproject.toml)
# torch is pinned here (2.13.0, the CPU build on our machines) and installed only when .venv has
# no torch yet: on a GPU box install the torch build you want into .venv first and it is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: demo test test-fast lint install reasoner eval-reasoner reasoner-stages reasoner-planted planted-power screenshot
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m probes.run demo --out demo-out

test: $(VENV)/.installed
	$(PY) -m pytest -q

# --dist loadscope keeps a module's tests on one worker: its module-scoped fixtures are built once.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n auto --dist loadscope

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Retrain the shipped checkpoint (deterministic, about 10-15 min on 2 CPU cores) and re-measure it.
reasoner: $(VENV)/.installed
	$(PY) -m probes.reasoner.train
	$(PY) -m probes.reasoner.evaluate

eval-reasoner: $(VENV)/.installed
	$(PY) -m probes.reasoner.evaluate

# The checkpoints along training: the early SFT (the same run stopped after 150 steps), the GRPO
# fine-tune (TRL, the optional `train` extra, in its own venv .venv-train; about 8 min on 2 CPU
# cores) and the accuracy of each stage on 500 fresh problems.
TRAIN_VENV := .venv-train
reasoner-stages: $(VENV)/.installed
	$(PY) -m probes.reasoner.train --stop-after 150 --threads 1 --out probes/reasoner/checkpoint_sft_early
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -c "import torch" 2>/dev/null || $(TRAIN_VENV)/bin/pip install --quiet $(TORCH)
	$(TRAIN_VENV)/bin/pip install --quiet -e ".[train]"
	$(TRAIN_VENV)/bin/python -m probes.reasoner.grpo --out probes/reasoner/checkpoint_grpo --max-minutes 17
	$(PY) -m probes.reasoner.stages

# The planted-effect organism tiny-reasoner-planted (docs/models.md): retrain it (deterministic, one
# thread, about 13 min on a shared 2-core machine) and measure it; planted-power reruns the
# detection and power table of docs/statistics.md ("Power on planted effects") into planted-out/.
reasoner-planted: $(VENV)/.installed
	$(PY) -m probes.reasoner.train --task planted
	$(PY) -m probes.reasoner.evaluate --task planted --model tiny-reasoner-planted --batch-size 64

planted-power: $(VENV)/.installed
	$(PY) bench/planted_power.py --out planted-out --reps 40

# The README's picture of the report: the demo, then its report rendered by headless Chromium.
screenshot: $(VENV)/.installed
	$(PY) -m probes.run demo --out demo-out
	$(PY) -m probes.run report demo-out --out demo-out/report.html --screenshot docs/report.png
