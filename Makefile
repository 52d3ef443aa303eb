# Two commands on a fresh clone, nothing installed by hand:
#   make demo   set up .venv, then train tiny-moe on the default corpus and report
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, with the exact pin: the local CPU wheel serves it, an unpinned torch would pull CUDA.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.smoe-installed
# System packages from Debian: the default corpus's prose (Jane Austen's novels, public domain,
# in r-cran-janeaustenr) and tcmalloc, which the smoe launcher preloads on CPU (it avoids
# re-faulting large freshly allocated tensors; see BENCHMARKS.md). The tests also need Debian's
# chromium and its driver (the dashboard's headless-browser test; nothing is downloaded at run
# time).
AUSTEN   := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
APT_PKGS := r-cran-janeaustenr libtcmalloc-minimal4
TEST_APT_PKGS := chromium chromium-driver
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Exact versions of every dependency, made by pip-tools from pyproject.toml (`make lock`).
# transformers is held at the newest release smoe's suite passes with; `make test-latest`
# tries the newest allowed versions in a separate environment and tells when that moves.
LOCK       := requirements.lock
BENCH_LOCK := requirements-bench.lock
LOCK_PINS  := -P transformers==5.23.0 -P torch==2.13.0+cpu
LATEST     := .venv-latest
PYTEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0

.PHONY: demo test test-latest setup sysdeps testdeps bench lock clean

setup: sysdeps $(STAMP)

# Checked on every run (cheap), installed only when missing.
sysdeps:
	@if [ ! -f $(AUSTEN) ] || { [ "$$(uname -m)" = x86_64 ] && [ ! -f $(TCMALLOC) ]; }; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	fi

testdeps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing Debian packages: $(TEST_APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(TEST_APT_PKGS) >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PIP) install --quiet pip==26.3
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(PY) -m smoe.demo

test: setup testdeps
	LD_PRELOAD="$$([ -f $(TCMALLOC) ] && echo $(TCMALLOC))" $(PYTEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile

# The newest versions pyproject.toml allows, in their own environment: an upcoming break shows
# here before a lock update brings it in. Informative; CI runs `make test`.
test-latest: sysdeps testdeps
	[ -x $(LATEST)/bin/python ] || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet $(TORCH)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|safetensors|tokenizers|fastapi)=='
	LD_PRELOAD="$$([ -f $(TCMALLOC) ] && echo $(TCMALLOC))" $(PYTEST_ENV) $(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile

# Regenerate the lock files from pyproject.toml (pip-tools in a throwaway environment).
lock:
	[ -x .venv-lock/bin/pip-compile ] || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet pip-tools==7.6.2; }
	.venv-lock/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url --extra dev $(LOCK_PINS) -o $(LOCK) pyproject.toml
	.venv-lock/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url --extra dev --extra bench $(LOCK_PINS) -o $(BENCH_LOCK) pyproject.toml

BENCH_STAMP := $(VENV)/.smoe-bench-installed
$(BENCH_STAMP): pyproject.toml $(BENCH_LOCK) | $(STAMP)
	$(PIP) install --quiet -r $(BENCH_LOCK)
	$(PIP) install --quiet --no-deps torchtitan==0.3.0
	touch $(BENCH_STAMP)

# The layer benchmark against the peers (about 10 minutes on a quiet 2-core machine).
bench: setup $(BENCH_STAMP)
	$(PY) benchmarks/layer.py --write

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock runs .pytest_cache .hypothesis
