# One command each, on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin the CPU build of torch; on GPU machines install your CUDA torch into the venv
# first and run `make setup TORCH_CONSTRAINTS=`.
TORCH_CONSTRAINTS ?= constraints/cpu.txt
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e ".[dev]"
	touch $@

# Ends with the demo's HTML report (contact sheet, provenance on click); open the printed path in a browser.
demo: setup
	$(VENV)/bin/batchgen run jobs/demo.yaml
	$(VENV)/bin/batchgen report out/demo --to out/demo-report

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark programs (tens of minutes on 2 cores); tables on stdout, JSON in bench/out/, figures in
# bench/RESULTS.md. bench/gpu.py needs a CUDA GPU and is run by hand.
bench: setup
	$(PY) bench/efficiency.py
	$(PY) bench/baselines.py
	$(PY) bench/orchestration.py
	$(PY) bench/raydata_driver.py
	$(PY) bench/coldstart.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf out models .pytest_cache
