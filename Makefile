# Two set-up commands (clone, `make setup`), then `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# On this CPU machine torch==2.13.0 is the local CPU build; on GPU machines set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-bench bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/blockskip demo

test: setup
	$(PY) -m pytest -q

# the benchmark scripts run end to end at small settings (about 4 minutes; CI runs it after `make test`)
test-bench: setup
	$(PY) -m pytest -q -m bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache
