# Two commands for a newcomer: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
# Both create .venv on first use with the pinned versions in constraints.txt (torch 2.13.0 CPU on dev machines).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := torch triton numpy pybind11 ninja cmake pytest setuptools wheel mlxtend pillow

.PHONY: setup build test test-fast test-gpu-stack demo bench lint clean aot-venv

$(VENV)/.deps: constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(DEPS)
	touch $@

# The GPU machine's Triton (3.6, with a numpy its interpreter accepts) in its own environment, for
# tests/test_aot.py's second compile of every kernel (GM_AOT_PYTHON=$(AOT_VENV)/bin/python; .ci/run sets it).
AOT_VENV ?= .venv-triton36
$(AOT_VENV)/.deps:
	test -x $(AOT_VENV)/bin/python || python3 -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 numpy==2.2.6
	touch $@

aot-venv: $(AOT_VENV)/.deps

# The GPU machine's versions (Python 3.12, torch 2.11.0: a CUDA build that runs on the CPU here, Triton 3.6 with a
# numpy its interpreter accepts) in an environment of their own, for `make test-gpu-stack`: the whole suite under the
# versions bench/gpu_check.sh meets, without a GPU, gm._C built for that Python (its own build directory).
# GPU_STACK_PYTHON names a Python 3.12. Not in CI: the CUDA torch wheel and its libraries are ~5 GB.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
$(GPU_STACK_VENV)/.deps:
	test -x $(GPU_STACK_VENV)/bin/python || $(GPU_STACK_PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pip install -q torch==2.11.0 triton==3.6.0 pytest==9.2.0 mlxtend==0.25.0 pillow \
	  setuptools wheel pybind11==3.1.0 ninja cmake
	$(GPU_STACK_VENV)/bin/python -m pip install -q numpy==2.2.6  # after mlxtend, which asks for a newer one
	touch $@

test-gpu-stack: $(GPU_STACK_VENV)/.deps
	$(GPU_STACK_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(GPU_STACK_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The extension is rebuilt incrementally (CMake in build/) on every setup, so edits to csrc/ are picked up.
build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

setup: build

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job: train the default PixelCNN on the embedded digits (4 minutes on a CPU; 10 minutes, batch 128 on a GPU),
# then print where the sample grid, metrics and checkpoint are.
demo: build
	rm -rf runs/demo
	$(PY) -m gm train pixelcnn --preset mnist --out runs/demo --eval-every 500 --sample-every 0 --n-samples 64 \
	  $$($(PY) -c 'import torch; print("--max-minutes 10 --batch-size 128" if torch.cuda.is_available() else "--max-minutes 4")')

bench: build
	$(PY) -m bench

lint: $(VENV)/.deps
	$(PY) -m ruff check . || true

clean:
	rm -rf build *.egg-info gm/_C*.so
