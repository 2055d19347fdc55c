# Set-up and the two everyday commands. `make train` and `make test` create .venv on first use:
# torch==2.13.0 (the CPU build these machines have as a local file) first, then scalelab with its test extras.
# GPU users: skip this file and `pip install -e '.[test]'` into an environment that already has their CUDA torch.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS   ?=

.PHONY: setup train test bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "scalelab needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

train: setup
	$(VENV)/bin/scalelab train $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: setup
	$(VENV)/bin/python bench/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
