# Two commands set everything up on a fresh machine:
#   make demo   install into .venv, then run the main job on the embedded default model
#   make test   install into .venv, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

# Which torch .venv uses. torch is installed first and explicitly, so nothing pulls a multi-GB
# CUDA build, and a CUDA build the machine already has is kept (docs/jetson.md):
#   SYSTEM_TORCH=auto  (default) where $(PYTHON) imports a CUDA build of torch (JetPack's wheel
#                      on a Jetson, a desktop's CUDA torch), .venv is made with
#                      --system-site-packages and uses that one; elsewhere TORCH_SPEC goes in
#   SYSTEM_TORCH=1     the same, and an error where $(PYTHON) has no CUDA torch; 0: never
#   TORCH_SPEC=...     given to make, it is installed whatever $(PYTHON) has; empty: install
#                      none and keep the torch .venv already sees
# One line says which torch and why. The package is then installed beside that torch pinned,
# so that pip may refuse it (a version outside pyproject.toml's range) but never replace it.
TORCH_SPEC ?= torch==2.13.0
SYSTEM_TORCH ?= auto
# "<version> <CUDA version> <device seen>" where $(PYTHON)'s torch is a CUDA build, else nothing
TORCH_PROBE := import torch; torch.version.cuda and print(torch.__version__, torch.version.cuda, torch.cuda.is_available())
# the version of the torch distribution .venv sees, as pip sees it (without importing torch)
TORCH_IN_VENV := $(PY) -c "from importlib.metadata import version; print(version('torch'))"

.PHONY: install browser aarch64-compiler demo test lint clean

install:
	@set -e; \
	case "$(SYSTEM_TORCH)" in auto|0|1) ;; *) echo "SYSTEM_TORCH is auto, 0 or 1 (not '$(SYSTEM_TORCH)')"; exit 2;; esac; \
	found=; [ "$(SYSTEM_TORCH)" = 0 ] || found=$$($(PYTHON) -c "$(TORCH_PROBE)" 2>/dev/null) || found=; \
	if [ "$(SYSTEM_TORCH)" = 1 ] && [ -z "$$found" ]; then \
	  echo "SYSTEM_TORCH=1, but $(PYTHON) imports no CUDA build of torch"; exit 2; fi; \
	if [ -n "$$found" ] && { [ "$(SYSTEM_TORCH)" = 1 ] || [ "$(origin TORCH_SPEC)" = file ]; }; then \
	  set -- $$found; \
	  echo "torch: $$1 (CUDA $$2, device seen: $$3), $(PYTHON)'s own, kept: $(VENV) sees it through --system-site-packages"; \
	  grep -qs "include-system-site-packages = true" $(VENV)/pyvenv.cfg || $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PIP) install -q --upgrade pip; \
	  $(PY) -c "import sys, torch; sys.exit(torch.__file__.startswith(sys.prefix))" || { \
	    echo "$(VENV) holds a torch of its own, which hides $(PYTHON)'s: remove $(VENV) and run make again"; exit 2; }; \
	else \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PIP) install -q --upgrade pip; \
	  if [ -z "$(TORCH_SPEC)" ]; then \
	    version=$$($(TORCH_IN_VENV) 2>/dev/null) || { echo "TORCH_SPEC is empty, but $(VENV) sees no torch: install one into it, or give TORCH_SPEC"; exit 2; }; \
	    echo "torch: $$version, already in $(VENV), kept (TORCH_SPEC is empty)"; \
	  else \
	    if [ "$(SYSTEM_TORCH)" = 0 ]; then why="SYSTEM_TORCH=0"; \
	    elif [ -n "$$found" ]; then why="TORCH_SPEC was given; $(PYTHON)'s CUDA torch $${found%% *} is not used"; \
	    else why="$(PYTHON) imports no CUDA build of torch"; fi; \
	    echo "torch: $(TORCH_SPEC) into $(VENV) ($$why)"; \
	    $(PIP) install -q $(TORCH_SPEC); \
	  fi; \
	fi
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	@pin="torch==$$($(TORCH_IN_VENV))"; echo "$(PIP) install -q --no-build-isolation -e \".[dev]\" $$pin"; \
	$(PIP) install -q --no-build-isolation -e ".[dev]" "$$pin" || { \
	  echo "pip would not install rgpt_rt beside $$pin, which it must not replace; rgpt_rt asks for $$(grep -o '"torch[^"]*"' pyproject.toml) (pyproject.toml): docs/jetson.md, 'Which torch'"; exit 1; }
	$(PY) -c "import rgpt_rt._C as C; info = C.build_info(); print('rgpt_rt._C built:', 'C++ + CUDA ' + ','.join(info['cuda_architectures']) if info['cuda'] else 'C++ only')"

demo: install
	$(VENV)/bin/rgpt-rt describe examples/shapes.png --mask examples/shapes_mask.png --stream

# Debian's chromium for the page's browser test (Playwright drives it; it downloads no browser).
# Installed only where it is missing; where it cannot be, that test skips and says why.
browser:
	@test -x /usr/bin/chromium || { echo "installing chromium (apt-get) for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the browser test will skip"; }

# Debian's aarch64 cross compiler for tests/test_aarch64_build.py, which compiles csrc's CPU
# sources for aarch64 (a Jetson's CPU). Best effort like browser: where it cannot be installed,
# that test skips and says why.
aarch64-compiler:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { echo "installing g++-aarch64-linux-gnu (apt-get) for the aarch64 build test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu) >/dev/null 2>&1 \
	  || echo "g++-aarch64-linux-gnu could not be installed: the aarch64 build test will skip"; }

test: install browser aarch64-compiler
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check rgpt_rt tests export benchmarks scripts
	$(VENV)/bin/ruff format --check rgpt_rt tests export benchmarks scripts

clean:
	rm -rf build .pytest_cache
