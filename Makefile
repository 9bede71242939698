# Two commands set everything up on a fresh machine:
#   make demo   install into .venv, then run the main job on the embedded default model
#   make test   install into .venv, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is installed first and explicitly, so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser demo test lint clean

install:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import rgpt_rt._C as C; info = C.build_info(); print('rgpt_rt._C built:', 'C++ + CUDA ' + ','.join(info['cuda_architectures']) if info['cuda'] else 'C++ only')"

demo: install
	$(VENV)/bin/rgpt-rt describe examples/shapes.png --mask examples/shapes_mask.png --stream

# Debian's chromium for the page's browser test (Playwright drives it; it downloads no browser).
# Installed only where it is missing; where it cannot be, that test skips and says why.
browser:
	@test -x /usr/bin/chromium || { echo "installing chromium (apt-get) for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the browser test will skip"; }

test: install browser
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check rgpt_rt tests export benchmarks scripts
	$(VENV)/bin/ruff format --check rgpt_rt tests export benchmarks scripts

clean:
	rm -rf build .pytest_cache
