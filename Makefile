# make demo   TOFU vs cross entropy SFT through Megatron-Core, TP=2 (CPU: ~5 min on 2 cores)
# make study  seeded gamma/beta study vs cross entropy sampled hotter (CPU: ~15 CPU-min per rank, 22-31 min on a busy 2-core machine)
# make test   create .venv (Python 3.12), install pinned deps + this package, run all tests (its time:
#             tests/README.md). VENV=path uses an existing environment instead of .venv (the pinned
#             versions are installed into it)
# make test-fast  the same venv; the kernels, the core and the API on CPU: tests/kernels,
#             tests/distributed and tests/test_structure.py without the slow, megatron, hf and
#             gpu tests (layout, markers and times: tests/README.md)
# make test-static  the static GPU check (docs/design.md section 3): every kernel compiled for
#             sm_80, sm_90 and sm_100 without a GPU, its SASS against the budgets, the ops on fake
#             CUDA tensors (tests/static; part of make test)
# make test-newest  the newest torch and Triton the package index serves, in their own venv
#             (.venv-newest), with the package pip-installed from a copy of the working tree
#             (build/newest): the make test-fast tests, tests/kernels/test_compile.py and
#             the static check of the Triton kernels, tests/static/test_triton_static.py
# make lint  ruff check and ruff format --check (configured in pyproject.toml; CI runs it)
# make bench  run the loss benchmark (CPU: tiny shapes, not a performance result)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.12: the pyenv install (on the development image the bare python3.12 shim fails).
PYTHON312 ?= $(shell for p in "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3" python3.12 python3; do \
    "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)

.PHONY: demo study test test-fast test-static lint test-newest bench venv venv-newest clean

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
	# Axolotl (tests/hf/test_axolotl.py), one folder (axolotl-contribs-* install into the axolotl
	# package): its config code (axolotl.cli.config: addict ... llvmlite, posthog for its telemetry,
	# which the tests turn off), then the imports of its model loader and trainer builder (wandb ...)
	$(PY) -m pip install -q --no-deps --target $(VENV)/axolotl-0.21.0 axolotl==0.21.0 addict==2.4.0 colorama==0.4.6 \
	    requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 posthog==6.7.11 \
	    six==1.17.0 backoff==2.2.1 distro==1.9.0 numba==0.68.1 llvmlite==0.50.0 \
	    wandb==0.31.0 protobuf==7.36.2 platformdirs==4.14.9 opentelemetry-api==1.45.3 evaluate==0.4.1 \
	    bitsandbytes==0.50.2 fastcore==2.2.41 termcolor==3.3.0 axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6
	# torchtitan's loss, config and model code and its config_registry / ConfigManager
	# (tests/distributed/test_torchtitan.py)
	$(PY) -m pip install -q --no-deps --target $(VENV)/torchtitan-0.3.0 torchtitan==0.3.0 spmd-types==0.2.3 \
	    tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0 torchdata==0.11.0 tensorboard==2.21.0 \
	    protobuf==7.36.2 absl-py==2.5.1
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
FAST_MARKERS = not slow and not megatron and not hf and not gpu
test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "$(FAST_MARKERS)" $(FAST_TESTS)

# ruff (pyproject.toml): the linter, and the formatter in check mode; `ruff format .` formats
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-static: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/static

# The newest torch (which brings its Triton) in a venv of its own. The package is installed
# there as a user installs it (pip install --no-build-isolation ., which builds the CUDA
# extension against that torch where nvcc exists; for sm_90 alone unless TORCH_CUDA_ARCH_LIST
# says otherwise: the default three architectures take a minute longer and the job only
# checks that it builds and loads), from a copy of the working tree's tracked
# and untracked, not ignored files: the tree's own build of the extension (built against the
# pinned torch) and its editable install in .venv are neither used nor touched. In the copy,
# tofu_kernels/ and megatron_patch/ are then links to the installed package, so the tests
# (which import the package from the tree's root, as do the processes they start there) run
# what pip installed. The venv is created once: rm -rf .venv-newest picks up newer releases.
NEWEST_VENV ?= .venv-newest
NEWEST_TREE ?= build/newest
NEWEST_PY := $(abspath $(NEWEST_VENV))/bin/python
# A global pip configuration may cap torch with a constraint file (e.g. at requirements-dev.txt's
# pin). For this venv only, the cap is lifted: its pip commands replace the configured
# constraint file with an empty one (PIP_CONSTRAINT); every other pip setting still applies.
NEWEST_PIP = PIP_CONSTRAINT=/dev/null $(NEWEST_PY) -m pip
NEWEST_STATIC = tests/static/test_triton_static.py

venv-newest: $(NEWEST_VENV)/.installed

$(NEWEST_VENV)/.installed:
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (pyenv install 3.12.1)"; exit 1; }
	rm -rf $(NEWEST_VENV)
	$(PYTHON312) -m venv $(NEWEST_VENV)
	$(NEWEST_PIP) install -q --upgrade pip
	$(NEWEST_PIP) install -q torch "numpy<2.4" pytest pytest-xdist setuptools wheel
	touch $@

test-newest: venv-newest
	rm -rf $(NEWEST_TREE)
	mkdir -p $(NEWEST_TREE)
	set -o pipefail; git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - \
	    | tar -xf - -C $(NEWEST_TREE)
	cd $(NEWEST_TREE) && { TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} $(NEWEST_PIP) install -v --no-build-isolation . > pip-install.log 2>&1 \
	    || { tail -n 60 pip-install.log; echo "error: pip install failed (log: $(NEWEST_TREE)/pip-install.log)"; exit 1; }; }
	@grep -E "tofu-kernels setup" $(NEWEST_TREE)/pip-install.log || true
	# -I: not the copy's folder but the installed package
	site=$$($(NEWEST_PY) -I -c "import os, tofu_kernels; print(os.path.dirname(os.path.dirname(tofu_kernels.__file__)))") \
	    && for p in tofu_kernels megatron_patch; do rm -rf $(NEWEST_TREE)/$$p; ln -s "$$site/$$p" $(NEWEST_TREE)/$$p; done
	cd $(NEWEST_TREE) && $(NEWEST_PY) -c "import sys, numpy, torch, triton, tofu_kernels as tk; \
	    print(f'test-newest: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), ' \
	          f'Triton {triton.__version__}, numpy {numpy.__version__}'); \
	    print('test-newest: CUDA extension loaded:', tk.extension_loaded(), '|', tk.extension_status())"
	cd $(NEWEST_TREE) || exit 1; rc=0; \
	    $(NEWEST_PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "$(FAST_MARKERS)" $(FAST_TESTS) || rc=1; \
	    $(NEWEST_PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/kernels/test_compile.py $(NEWEST_STATIC) \
	        || rc=1; \
	    exit $$rc

bench: venv
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build *.egg-info
