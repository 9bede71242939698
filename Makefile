# Two commands set everything up on a fresh machine:
#   make demo   install into .venv, then run the main job on the embedded default model
#   make test   install into .venv, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is installed first and explicitly, so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint clean

install:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import rgpt_rt._C as C; info = C.build_info(); print('rgpt_rt._C built:', 'C++ + CUDA ' + ','.join(info['cuda_architectures']) if info['cuda'] else 'C++ only')"

demo: install
	$(VENV)/bin/rgpt-rt describe examples/shapes.png --mask examples/shapes_mask.png --stream

test: install
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check rgpt_rt tests export benchmarks scripts
	$(VENV)/bin/ruff format --check rgpt_rt tests export benchmarks scripts

clean:
	rm -rf build .pytest_cache
