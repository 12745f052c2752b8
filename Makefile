# The two commands a new machine needs:
#   make demo   set up, then run the DPO pipeline on the embedded model (a few minutes on 2 CPU cores)
#   make test   set up, then run the test suite
PY := $(if $(VIRTUAL_ENV),python,.venv/bin/python)

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m preftune demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_dpo.py $(ARGS)
