# make demo : the whole pipeline on the embedded default (MODEL=<hf id or path> for a real model;
#             DEVICE=cpu|cuda|auto DTYPE=bfloat16 CORPUS=flores|demo|udhr LANGS=en,de)
# make test : lint + the test suite (executes the notebooks too)
# Both create .venv and install what they need: the CPU torch wheel first, then the rest.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
MODEL ?= demo
DEVICE ?=
DTYPE ?= auto
CORPUS ?=
LANGS ?=
DEMO_ARGS := --model "$(MODEL)" --dtype "$(DTYPE)" $(if $(DEVICE),--device "$(DEVICE)") \
	$(if $(CORPUS),--corpus "$(CORPUS)") $(if $(LANGS),--langs "$(LANGS)")
# FLORES+ needs the datasets extra: asked for (CORPUS=flores), or the default corpus of a real model
NEEDS_DATASETS := $(or $(filter flores,$(CORPUS)),$(and $(if $(CORPUS),,1),$(filter-out demo demo-trained demo-untrained,$(MODEL))))
PYTEST_ARGS ?=

.PHONY: install chromium test lint demo report bench clean-demo lab

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[notebooks,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (moe-routing)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders the report for the browser test and kaleido's static export.
chromium:
	@{ command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "noto sans cjk"; } || { \
	  echo "installing Debian's chromium (headless browser for figure checks)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-core fonts-noto-cjk >/dev/null) \
	  || echo "warning: could not install chromium; browser checks will be skipped"; }

lint: install
	$(BIN)/ruff check analysis tests benchmarks notebooks
	$(BIN)/mypy

test: install chromium lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install chromium
	$(if $(NEEDS_DATASETS),$(BIN)/python -m pip install -q -e ".[datasets]")
	$(BIN)/python -m moe_routing demo $(DEMO_ARGS)

report: install chromium
	$(BIN)/python -m moe_routing report

# JupyterLab on notebooks/: .py notebooks open as notebooks (jupytext), project kernel preselected (jupyter/)
lab: install
	$(BIN)/python -m moe_routing lab

bench: install
	$(BIN)/python benchmarks/run_all.py

clean-demo:
	rm -rf runs report
