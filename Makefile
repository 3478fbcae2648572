# The two commands (see README): `make bench` runs the main job, `make test` runs the tests.
# Both create .venv on first use: torch 2.13.0 where no torch is installed, triton, the test and
# benchmark tools, and this package with its C++ extension built against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_attn-installed
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: install bench test clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ninja pybind11 numpy
	FUSED_ATTN_REQUIRE_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e '.[test,bench,hf]'
	touch $@

install: $(STAMP)

bench: $(STAMP)
	$(PY) -m fused_attn.bench $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q $(TEST_ARGS)

clean:
	rm -rf build $(VENV) fused_attn/_C*.so *.egg-info
