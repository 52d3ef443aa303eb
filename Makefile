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
# re-faulting large freshly allocated tensors; see BENCHMARKS.md).
AUSTEN   := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
APT_PKGS := r-cran-janeaustenr libtcmalloc-minimal4
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup sysdeps bench clean

setup: sysdeps $(STAMP)

# Checked on every run (cheap), installed only when missing.
sysdeps:
	@if [ ! -f $(AUSTEN) ] || { [ "$$(uname -m)" = x86_64 ] && [ ! -f $(TCMALLOC) ]; }; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m smoe.demo

test: setup
	LD_PRELOAD="$$([ -f $(TCMALLOC) ] && echo $(TCMALLOC))" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

BENCH_STAMP := $(VENV)/.smoe-bench-installed
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(PIP) install --quiet -e ".[dev,bench]"
	$(PIP) install --quiet --no-deps torchtitan==0.3.0
	touch $(BENCH_STAMP)

# The layer benchmark against the peers (about 10 minutes on a quiet 2-core machine).
bench: setup $(BENCH_STAMP)
	$(PY) benchmarks/layer.py --write

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
