# cxrdist — every install step lives here: CI and new sessions start on fresh machines.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg
# pinned: local wheels on this machine (pip is capped at these versions)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast slurm-deps slurm-up slurm-down bench clean

$(BIN)/cxrdist: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/cxrdist

# Debian's SLURM and munge, for the real-cluster tests (installs nothing when present).
slurm-deps:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }

slurm-up: slurm-deps
	slurm/cluster.sh start

slurm-down:
	slurm/cluster.sh stop

# The main job on the embedded demo data: what `python launchers/submit.py --nodes 1 --gpus 4` does on a laptop.
# The launch command is the README's; the train options after -- size it for a 2-core laptop.
demo: setup
	rm -rf runs/demo
	$(BIN)/python launchers/submit.py --nodes 1 --gpus 4 --backend ddp --wait -- \
	    --out runs/demo --epochs 5 --batch-size 16 --image-size 64
	$(BIN)/cxrdist report runs/demo --out runs/demo/report

test: setup slurm-deps
	$(BIN)/python -m pytest -x -q tests

test-fast: setup
	$(BIN)/python -m pytest -x -q tests -m "not slow and not slurm"

bench: setup
	$(BIN)/cxrdist bench loader --out reports/bench_loader.json
	$(BIN)/cxrdist bench pack --out reports/bench_pack.json
	$(BIN)/cxrdist bench step --out reports/bench_step.json

clean:
	rm -rf $(VENV) .cache build *.egg-info
