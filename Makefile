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

.PHONY: demo test setup bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m smoe.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/layer.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
