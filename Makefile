# The two commands: `make demo` and `make test`. Both create .venv on first use.
# Also: `make test-fast` (the unit tier, a few minutes) and `make lint` (ruff).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-fast lint install libtpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# libtpu (XLA's TPU compiler) in a private directory: the planner compiles for TPU slices with it
# on any machine; kept off the venv's path so JAX does not probe for a TPU at every start. The
# version is the one jax's [tpu] extra pins.
LIBTPU := $(VENV)/libtpu
$(LIBTPU)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(LIBTPU) "$$($(PY) -c "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')))")"
	touch $@

libtpu: $(LIBTPU)/.installed

demo: $(STAMP)
	$(PY) demos/end_to_end.py --config configs/demo.py --prior_config configs/prior_demo.py \
	    --workdir $${WORKDIR:-/tmp/percov2_demo}

test: $(STAMP) $(LIBTPU)/.installed
	PERCOV2_LIBTPU_PATH=$(abspath $(LIBTPU)) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

# The unit tier: no subprocesses, no multi-device or multi-process runs, no model training, no
# PyTorch reference models (markers in pyproject.toml); `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow and not integration and not parity" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache
