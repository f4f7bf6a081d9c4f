# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (or `make test-fast`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featureshift-installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featureshift demo --out demo-run

test: $(STAMP)
	$(PY) -m pytest

# The tests not marked slow, for while you work (55 s, 56 s of CPU, on this 2-core Xeon with nothing
# else running, load 2 from the run itself, 2026-12-06; 119 s while other tests shared the cores);
# `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Each script prints both sides of its comparison and their ratio. render_speed.py needs Lucent
# (see docs/render.md); the others need nothing more than the test extra.
bench: $(STAMP)
	$(PY) benchmarks/startup_speed.py
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/timeline_speed.py
	$(PY) benchmarks/ray_speed.py
	$(PY) benchmarks/atlas_speed.py
	$(PY) benchmarks/floor_cost.py
	$(PY) benchmarks/render_speed.py

clean:
	rm -rf demo-run .pytest_cache
