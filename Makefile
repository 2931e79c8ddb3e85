# make demo   TOFU vs cross entropy SFT through Megatron-Core, TP=2 (CPU: ~5 min on 2 cores)
# make study  seeded gamma/beta study vs cross entropy sampled hotter (CPU: ~15 CPU-min per rank, 22-31 min on a busy 2-core machine)
# make test   create .venv (Python 3.12), install pinned deps + this package, run all tests
#             (CPU: 13-20 min on 2 cores)
# make test-fast  the same venv; the kernels, the core and the API on CPU: tests/kernels,
#             tests/distributed and tests/test_structure.py without the slow, megatron, hf and
#             gpu tests (under 3 min on 2 cores; layout and markers: tests/README.md)
# make bench  run the loss benchmark (CPU: tiny shapes, not a performance result)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.12: the pyenv install (on the development image the bare python3.12 shim fails).
PYTHON312 ?= $(shell for p in "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3" python3.12 python3; do \
    "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)

.PHONY: demo study test test-fast bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (pyenv install 3.12.1)"; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# megatron-core 0.16.0 beside the pinned 0.19.2, for the compatibility test
	$(PY) -m pip install -q --no-deps --target $(VENV)/megatron-core-0.16.0 megatron-core==0.16.0
	# Frameworks the tests run but that are too heavy to install whole: --no-deps side folders,
	# put on the path only by the tests that need them (tests/support/side_folders.py).
	# DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo): the ZeRO parity tests
	$(PY) -m pip install -q --no-deps --target $(VENV)/deepspeed-0.19.8 deepspeed==0.19.8 hjson==3.1.0 \
	    msgpack==1.2.4 py-cpuinfo==9.0.0 ninja==1.13.2 einops==0.8.2
	# NeMo Automodel's loss, config and LinearCrossEntropy code (tests/hf/test_automodel.py)
	$(PY) -m pip install -q --no-deps --target $(VENV)/nemo-automodel-0.7.0 nemo-automodel==0.7.0
	# Megatron-Bridge's training/losses.py under megatron.core's schedule (tests/megatron/test_bridge.py)
	$(PY) -m pip install -q --no-deps --target $(VENV)/megatron-bridge-0.6.2 megatron-bridge==0.6.2
	# builds the CUDA extension (tofu_kernels._C) when nvcc + CUDA torch exist; see setup.py
	set -o pipefail; $(PY) -m pip install -v --no-build-isolation -e . 2>&1 | { grep -E "tofu-kernels setup|rror:" || true; }
	$(PY) -c "import tofu_kernels as tk; print('CUDA extension loaded:', tk.extension_loaded())"
	touch $@

# Output goes to the git-ignored OUT; `make demo OUT=examples/results` (or study) replaces
# the committed results on purpose.
OUT ?= examples/results/local
DEMO_ARGS ?=
STUDY_ARGS ?=
TORCHRUN_TP2 = set -o pipefail; OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(PY) -m torch.distributed.run --standalone \
    --nproc-per-node 2
QUIET = 2>&1 | { grep --line-buffered -vE "DEPRECATED|cpp_extension" || true; }

demo: venv
	$(TORCHRUN_TP2) examples/diversity_demo.py --out $(OUT) $(DEMO_ARGS) $(QUIET)

study: venv
	$(TORCHRUN_TP2) examples/diversity_study.py --out $(OUT) $(STUDY_ARGS) $(QUIET)

# test files run TEST_WORKERS at a time (each file's tests in order, in one worker)
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

FAST_TESTS = tests/test_structure.py tests/kernels tests/distributed
test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not megatron and not hf and not gpu" \
	    $(FAST_TESTS)

bench: venv
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) build *.egg-info
