# The two commands of this project: `make train ARGS="..."` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: train test install lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# litdata requires torchvision, but only imports it for image data; the PyPI build does not
	# load beside the CPU torch wheel and would break `import lightning`. Remove it.
	$(PY) -m pip uninstall -q -y torchvision
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m tinyreason.train $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check tinyreason tests && $(VENV)/bin/ruff format --check tinyreason tests

clean:
	rm -rf $(VENV) outputs multirun data_cache .pytest_cache
