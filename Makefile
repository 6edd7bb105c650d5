# `make demo` and `make test` build .venv on first use (pinned versions from requirements.lock),
# then do their job; later runs skip the install unless pyproject.toml or the lock changed.
# `make env-gpu` builds .venv-gpu from requirements-gpu.lock (ONNX Runtime CUDA; docs/gpu.md) and
# `make env-edge` builds .venv-edge, the timing side alone without PyTorch (docs/edge.md).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PY3 ?= python3
# pip byte-compiles every installed file one at a time (a third of the install); compileall does it on every
# core afterwards. Like pip, it skips the files it cannot compile (torch ships one in Python 3.12 syntax).
PIP_INSTALL := -m pip install --quiet --disable-pip-version-check --no-compile
COMPILE := -m compileall -qq -j 0

.PHONY: demo test env env-gpu env-edge clean

env: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PYTHON) || $(PY3) -m venv $(VENV)
	$(PYTHON) $(PIP_INSTALL) -r requirements.lock
	$(PYTHON) $(PIP_INSTALL) --no-deps -e .
	$(PYTHON) $(COMPILE) $(VENV)/lib || true
	touch $(STAMP)

# onnxruntime-gpu replaces onnxruntime (one module, two wheels), so foldship goes in without its
# dependencies here: its metadata names onnxruntime.
env-gpu: .venv-gpu/.installed

.venv-gpu/.installed: pyproject.toml requirements-gpu.lock
	test -x .venv-gpu/bin/python || $(PY3) -m venv .venv-gpu
	.venv-gpu/bin/python $(PIP_INSTALL) -r requirements-gpu.lock
	.venv-gpu/bin/python $(PIP_INSTALL) --no-deps -e .
	.venv-gpu/bin/python $(COMPILE) .venv-gpu/lib || true
	touch $@

env-edge: .venv-edge/.installed

.venv-edge/.installed: pyproject.toml requirements-edge.lock
	test -x .venv-edge/bin/python || $(PY3) -m venv .venv-edge
	.venv-edge/bin/python $(PIP_INSTALL) -r requirements-edge.lock
	.venv-edge/bin/python $(PIP_INSTALL) --no-deps -e .
	.venv-edge/bin/python $(COMPILE) .venv-edge/lib || true
	touch $@

demo: $(STAMP)
	$(VENV)/bin/foldship build --config examples/demo.yaml --out runs/demo --overwrite

# Two worker processes of one thread each, a test file per worker at a time (its module fixtures built once):
# about 1.8x faster than one process on two cores, where two PyTorch thread pools share the cores badly.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .venv-gpu .venv-edge runs .pytest_cache .hypothesis
