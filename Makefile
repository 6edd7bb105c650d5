# `make demo` and `make test` build .venv on first use (pinned versions from requirements.lock),
# then do their job; later runs skip the install unless pyproject.toml or the lock changed.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PY3 ?= python3

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PYTHON) || $(PY3) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/foldship build --config examples/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
