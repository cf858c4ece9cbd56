# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# the project into it first, through requirements.lock (the exact versions the suite passed on).
# TORCH_SPEC picks the torch build: the default pin resolves to a CPU build on the CI machines; GPU
# users pass TORCH_SPEC=torch (the CUDA build from PyPI) or their own, and then the lock's torch and
# triton pins are left out (a CUDA torch brings the triton it was built with).
PYTHON ?= python3
VENV ?= .venv
CPU_TORCH := torch==2.13.0
TORCH_SPEC ?= $(CPU_TORCH)
LOCK ?= requirements.lock
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python

.PHONY: demo test install test-latest lock gpu-wheels
install: $(VENV)/.installed

$(VENV)/.installed: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	if [ "$(TORCH_SPEC)" = "$(CPU_TORCH)" ]; then cp $(LOCK) $(VENV)/constraints.txt; \
	else grep -vE '^(torch|triton)==' $(LOCK) > $(VENV)/constraints.txt; fi
	$(PY) -m pip install -q -c $(VENV)/constraints.txt pip setuptools wheel
	$(PY) -m pip install -q -c $(VENV)/constraints.txt "$(TORCH_SPEC)" numpy
	# deepspeed builds from source and imports torch in its setup.py: build against the torch above
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/mtpeft demo

test: install
	$(PY) -m pytest -q tests

# Not run by CI: the newest release of every dependency (past setup.py's upper bounds; torch stays
# at TORCH_SPEC) in a separate venv, then the whole suite, so drift shows before users see it.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" numpy
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(LATEST_VENV)/bin/python .ci/unpinned_requirements.py > $(LATEST_VENV)/latest.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --no-build-isolation -r $(LATEST_VENV)/latest.txt pytest pytest-timeout
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|deepspeed|bitsandbytes|triton|datasets|accelerate)=='
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Refresh the lock from the newest releases, only once the whole suite passed on them.
lock: test-latest
	{ echo "# Written by 'make lock' on $$(date -u +%F): the whole suite passed on exactly these versions"; \
	  echo "# ($$($(LATEST_VENV)/bin/python -c 'import platform; print("Python", platform.python_version(), platform.machine())'), $(TORCH_SPEC))."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK)

# What the GPU machine's image lacks, as wheels in .whl/ (git-ignored) for bench/gpu_check.sh to
# install there (bench/README.md, "GPU check"), every version pinned to the lock. deepspeed has no
# wheel on PyPI: built here as a pure-Python wheel (its ops JIT-compile on the GPU when needed);
# the rest are downloaded for CPython 3.12 on manylinux x86_64. An existing venv is used as it is
# (a prerequisite on it would reinstall it whenever the lock is newer).
GPU_WHEELS := bitsandbytes datasets dill multiprocess hjson pydantic pydantic_core annotated-types \
	typing-inspection typing_extensions
GPU_WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels:
	test -x $(PY) || $(MAKE) install
	rm -rf .whl && mkdir .whl
	pin() { grep -i "^$$1==" $(LOCK) || { echo "$$1 is not pinned in $(LOCK)" >&2; exit 1; }; }; \
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl "$$(pin deepspeed)" && \
	specs=$$(for p in $(GPU_WHEELS); do pin $$p || exit 1; done) && \
	$(PY) -m pip download -q $(GPU_WHEEL_FLAGS) -d .whl $$specs
	ls -l .whl && du -ch .whl/*.whl | tail -1
