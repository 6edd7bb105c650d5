# `make demo` and `make test` build .venv on first use (pinned versions from requirements.lock),
# then do their job; later runs skip the install unless pyproject.toml or the lock changed.
# `make env-gpu` builds .venv-gpu from requirements-gpu.lock (ONNX Runtime CUDA; docs/gpu.md) and
# `make env-edge` builds .venv-edge, the timing side alone without PyTorch (docs/edge.md).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PY3 ?= python3
PIP_INSTALL := -m pip install --quiet --disable-pip-version-check

.PHONY: demo test env env-gpu env-edge clean

env: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PYTHON) || $(PY3) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# onnxruntime-gpu replaces onnxruntime (one module, two wheels), so foldship goes in without its
# dependencies here: its metadata names onnxruntime.
env-gpu: .venv-gpu/.installed

.venv-gpu/.installed: pyproject.toml requirements-gpu.lock
	test -x .venv-gpu/bin/python || $(PY3) -m venv .venv-gpu
	.venv-gpu/bin/python $(PIP_INSTALL) -r requirements-gpu.lock
	.venv-gpu/bin/python $(PIP_INSTALL) --no-deps -e .
	touch $@

env-edge: .venv-edge/.installed

.venv-edge/.installed: pyproject.toml requirements-edge.lock
	test -x .venv-edge/bin/python || $(PY3) -m venv .venv-edge
	.venv-edge/bin/python $(PIP_INSTALL) -r requirements-edge.lock
	.venv-edge/bin/python $(PIP_INSTALL) --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/foldship build --config examples/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) .venv-gpu .venv-edge runs .pytest_cache .hypothesis
