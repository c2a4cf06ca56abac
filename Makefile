# The two commands of the README. Each creates .venv when missing and installs the package with its
# dev extras; torch 2.14.1 / torchvision 0.29.1 install from the machine's local wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vitdistill demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# Every test runs at one torch thread (tests/conftest.py), so one pytest worker per core; a file's
# tests stay on one worker, which keeps its module fixtures from being built twice. At most 4
# workers (about 1 GB each), since a container can report more cores than its quota lets it use.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	sh tools/ensure-chromium.sh
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
