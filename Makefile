# Every target does its own set-up: it creates .venv and installs the package with pinned torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,dev,integrations]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sharpness compare

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cuda"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not cuda"

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/bench_sam_step.py
	$(PY) benchmarks/bench_erm_step.py
	$(PY) benchmarks/bench_msam_step.py
	$(PY) benchmarks/bench_train_loop.py
	$(PY) benchmarks/bench_hessian.py
	$(PY) benchmarks/bench_ddp.py
	$(PY) benchmarks/bench_fsdp_memory.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
