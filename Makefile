# cxrdist — every install step lives here: CI and new sessions start on fresh machines.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg
# pinned for make demo / make test (constraints.txt: local wheels on this machine, pip is capped at these);
# the package itself declares ranges (setup.cfg), so a cluster's own CUDA torch stays
CONSTRAINTS := constraints.txt

.PHONY: setup lint demo research-demo test test-heavy test-fast slurm-deps slurm-up slurm-down bench gpu-wheels gpu-check gpu-check-dry clean

# The last step: DeepSpeed JIT-builds its CPU comm op with g++ on first use (about a minute on 2 cores): here,
# once, into .cache/torch_extensions, instead of inside the first test or demo run that starts DeepSpeed.
$(BIN)/cxrdist: setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch torchvision
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test]'
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load()" >/dev/null 2>&1
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
# The launch command is the README's; the train options after -- size it for a 2-core laptop. The demo is the
# user's first proof, so it fails when the run did not learn: best val or test mean AUROC below DEMO_MIN_AUC
# (the demo reaches ~0.95; README "Demo").
DEMO_MIN_AUC ?= 0.85
demo: setup
	rm -rf runs/demo
	$(BIN)/python launchers/submit.py --nodes 1 --gpus 4 --backend ddp --wait -- \
	    --out runs/demo --epochs 5 --batch-size 16 --image-size 64
	$(BIN)/cxrdist eval --run runs/demo --split test --min-auc $(DEMO_MIN_AUC)
	$(BIN)/cxrdist report runs/demo --out runs/demo/report

# The cross-dataset matrix (a CheXpert run, an NIH run, a run on both mixed) and a seeds table from the demo data
# (CheXpert-layout demo shards + an NIH-layout set of the same size), with the tiny plumbing model so that it
# takes minutes on 2 cores: docs/demo/{matrix,seeds}
RD := .cache/research-demo
RD_TRAIN := --backend single --device cpu --workers 1 --image-size 64 --batch-size 32 --model cxrtiny
research-demo: setup
	rm -rf $(RD) && mkdir -p $(RD)
	$(BIN)/python -c "from cxrdist.demo import ensure_demo_shards; ensure_demo_shards('$(RD)/chexpert')"
	$(BIN)/cxrdist synth --layout nih --out $(RD)/nih-raw --n 2400 --size 128
	$(BIN)/cxrdist shard --source nih --root $(RD)/nih-raw --out $(RD)/nih --size 64 --samples-per-shard 250
	for s in chexpert nih; do $(BIN)/cxrdist train --shards $(RD)/$$s --out $(RD)/runs/$$s $(RD_TRAIN) --epochs 4 \
	    && $(BIN)/cxrdist eval --run $(RD)/runs/$$s; done
	$(BIN)/cxrdist eval --run $(RD)/runs/chexpert --shards $(RD)/nih --map-labels
	$(BIN)/cxrdist eval --run $(RD)/runs/nih --shards $(RD)/chexpert --map-labels
	$(BIN)/cxrdist train --shards $(RD)/chexpert,$(RD)/nih --out $(RD)/runs/mix $(RD_TRAIN) --epochs 4
	$(BIN)/cxrdist eval --run $(RD)/runs/mix
	$(BIN)/cxrdist report --matrix $(RD)/runs/chexpert $(RD)/runs/nih $(RD)/runs/mix --out docs/demo/matrix
	$(BIN)/python launchers/compare.py --nodes 1 --gpus 0 --backends single --models cxrtiny,resnet18 \
	    --seeds 0,1,2 --cluster local --wait --time 30 --log-dir $(RD)/logs -- --shards $(RD)/chexpert \
	    --device cpu --workers 1 --image-size 64 --batch-size 32 --epochs 2 --out $(RD)/seeds
	for r in $(RD)/seeds/*-s*; do $(BIN)/cxrdist eval --run $$r; done
	$(BIN)/cxrdist report $(RD)/seeds --out docs/demo/seeds --published docs/published/poster_table5.csv

# lint and format check (ruff, configured in pyproject.toml); the floor plan is checked by tests/test_floors.py
lint: setup
	$(BIN)/ruff check cxrdist launchers tests
	$(BIN)/ruff format --check cxrdist launchers tests

# The fast tier first (no training process, no cluster: a few minutes), so that a broken unit fails early;
# then the rest (markers: setup.cfg). Each prints its slowest tests, so a regression shows in every CI log.
# Two pytest-xdist workers: on 2 cores the training tests leave a core idle while they start processes, wait
# on servers, SLURM or a timeout; the tests of the one SLURM cluster run on one worker (tests/conftest.py).
# A third worker measured no faster (the slow tier alone: 972 s against 944 s with two, 2026-12-04).
PYTEST := $(BIN)/python -m pytest -x -q --durations=15 -n 2 --dist loadgroup
FAST := not slow and not slurm and not heavy
test: lint slurm-deps
	$(PYTEST) tests -m "$(FAST)"
	$(PYTEST) tests -m "(slow or slurm) and not heavy"

# what `make test` leaves out for time (DeepSpeed under --compile)
test-heavy: lint
	$(PYTEST) tests -m heavy

test-fast: lint
	$(PYTEST) tests -m "$(FAST)"

bench: setup
	$(BIN)/cxrdist bench loader --out reports/bench_loader.json
	$(BIN)/cxrdist bench pack --out reports/bench_pack.json
	$(BIN)/cxrdist bench step --out reports/bench_step.json
	$(BIN)/cxrdist bench trainer --out reports/bench_trainer.json

# --- a GPU node without network: `make gpu-wheels` here, carry .whl/ over, `make gpu-check` there ----------
# The node brings a CUDA torch, torchvision, timm, numpy, pandas, scikit-learn, rich, matplotlib, pyyaml; these
# are what it lacks (and their own dependencies), as the exact versions this venv runs, for CPython 3.12.
GPU_PKGS := deepspeed einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types \
            typing-inspection typing-extensions tqdm psutil packaging submitit cloudpickle webdataset braceexpand \
            pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls
GPU_PYVER ?= 3.12
# pip matches --platform tags exactly: every manylinux level a glibc >= 2.34 node runs (Ubuntu 22.04 and newer)
GPU_PLATFORMS := manylinux2014_x86_64 $(foreach v,17 24 27 28 31 34,manylinux_2_$(v)_x86_64) any
GPU_REPORT ?= reports/gpu
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	pins=$$($(BIN)/python -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:] if n != 'deepspeed'))" $(GPU_PKGS)) && \
	$(BIN)/pip download -q --no-deps --only-binary=:all: --dest .whl --python-version $(GPU_PYVER) \
	    --implementation cp $(foreach t,$(GPU_PLATFORMS),--platform $(t)) $$pins
	# deepspeed is an sdist on PyPI: build it here into a pure wheel (no ops compiled; torch from this venv)
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation --wheel-dir .whl \
	    deepspeed==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	@du -sh .whl && ls .whl | wc -l

# On the GPU node (PY: the python that holds the CUDA torch): the wheels into a throw-away folder on
# PYTHONPATH, the project from this source tree. Checks start only within GPU_BUDGET_S seconds (the rest is
# SKIP with the reason); gpucheck.json/.md in GPU_REPORT are rewritten after every check.
GPU_BUDGET_S ?= 420
gpu-check:
	@test -n "$$(ls .whl/*.whl 2>/dev/null)" || { echo "gpu-check: no .whl/ here: run 'make gpu-wheels' on a machine with the package index and carry .whl/ along"; exit 2; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m pip install -q --no-index --no-deps --target "$$tmp" .whl/*.whl && \
	PYTHONPATH="$$tmp:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PY) -m cxrdist.gpucheck --out $(GPU_REPORT) --budget-s $(GPU_BUDGET_S)

# The same harness on the CPU (gloo, tiny images, nothing timed): part of `make test` (tests/test_gpucheck.py);
# its budget only guards against a hang (a loaded CI box must not turn checks into SKIPs).
GPU_ONLY ?=
gpu-check-dry: setup
	$(BIN)/python -m cxrdist.gpucheck --dry --out $(GPU_REPORT)-dry --budget-s 1800 $(if $(GPU_ONLY),--only "$(GPU_ONLY)")

clean:
	rm -rf $(VENV) .cache build *.egg-info .whl
