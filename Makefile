# unipred: `make demo` (the main job) and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Run from the repo root without the source folders shadowing the installed package
# (tokenizers/ and tasks/ install as unipred.tokenizers / unipred.tasks).
export PYTHONSAFEPATH := 1
# System packages: FFmpeg libraries for torchcodec (audio/video decoding), speech synthesis
# for the spoken-digit data, and Debian's Fashion-MNIST for the image demo.
TEST_APT := ffmpeg espeak-ng flite
DEMO_APT := dataset-fashion-mnist espeak-ng flite ffmpeg
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: test demo demo-quick lint format system-test system-demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

system-test:
	@missing=""; for p in $(TEST_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null || \
	  echo "WARNING: could not install$$missing; tests that need them will be skipped"; \
	fi

system-demo:
	@missing=""; for p in $(DEMO_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null || \
	  echo "WARNING: could not install$$missing; the image demo will try torchvision's download instead"; \
	fi

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.test-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: system-test $(VENV)/.test-installed lint
	$(BIN)/python -m pytest -q

$(VENV)/.demo-installed: pyproject.toml $(VENV)/.test-installed
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

demo: system-demo $(VENV)/.demo-installed
	$(BIN)/unipred demo image

demo-quick: system-demo $(VENV)/.demo-installed
	$(BIN)/unipred demo image --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
