# Two commands on a fresh machine: `make test` and (once the demo exists) `make demo`.
# Both create .venv, install the CPU torch wheel and the project, then run.
# On a GPU machine set TORCH to the build you want, e.g. `make test TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test test-slow demo base-model
install: $(VENV)/.installed

# constraints.txt: the tested set of versions (README, "Versions"); CONSTRAINTS= installs the newest instead.
CONSTRAINTS ?= -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

# The learning runs that show each training method learns on shapes (minutes each on 2 CPU cores).
test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) -m latentsd.cli demo --out outputs/demo

# Rebuild the shipped base model from scratch (CPU: ~30 min; the recipe is in configs/train/shapes_*.yaml).
base-model: install
	$(PY) -m latentsd.cli make-shapes --out data/shapes_train --n 16000 --hold-out
	$(PY) -m latentsd.cli train-vae --config configs/train/shapes_vae.yaml
	$(PY) -m latentsd.cli train --config configs/train/shapes_base.yaml
	rm -rf latentsd/assets/shapes_base && cp -r outputs/shapes_base/model latentsd/assets/shapes_base
