# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# the project into it first. TORCH_SPEC picks the torch build: the default pin resolves to a CPU
# build on the CI machines; GPU users pass TORCH_SPEC=torch (the CUDA build from PyPI) or their own.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test install
install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy
	# deepspeed builds from source and imports torch in its setup.py: build against the torch above
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/mtpeft demo

test: install
	$(PY) -m pytest -q tests
