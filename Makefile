# Every target does its own set-up: it creates .venv and installs the package with pinned torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench bench-record lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,dev,integrations]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sharpness compare

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cuda"

# Every test with the large hypothesis profile CI uses (thousands of examples per property); tests marked cuda run
# where a GPU exists and skip elsewhere.
test-all: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

# Every benchmark; each prints its table and exits non-zero when a target fails (all run, then make fails).
# Results go to $(BENCH_OUT) (not tracked); `make bench-record` writes the tracked benchmarks/results/ instead.
BENCH_OUT ?= bench-results
BENCHMARKS := sam_step erm_step msam_step train_loop hessian ddp fsdp_memory

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	@mkdir -p $(BENCH_OUT); failed=""; \
	for name in $(BENCHMARKS); do \
		$(PY) benchmarks/bench_$$name.py --json $(BENCH_OUT)/$$name.json || failed="$$failed $$name"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmark targets missed:$$failed"; exit 1; fi

bench-record: BENCH_OUT = benchmarks/results
bench-record: bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
