# unipred: `make demo` (the main job) and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Run from the repo root without the source folders shadowing the installed package
# (tokenizers/ and tasks/ install as unipred.tokenizers / unipred.tasks).
export PYTHONSAFEPATH := 1
# System packages: FFmpeg libraries for torchcodec (audio/video decoding), speech synthesis
# for the spoken-digit data, Debian's Fashion-MNIST for the image demo, and word lists of 8
# languages for the text data (tests/test_text.py, `unipred demo text`).
TEST_APT := ffmpeg espeak-ng flite dataset-fashion-mnist \
	wamerican wngerman wfrench wspanish witalian wportuguese wdutch wswedish
DEMO_APT := dataset-fashion-mnist espeak-ng flite ffmpeg
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: install test demo demo-quick lint format lock check-lock system-test system-demo clean test-versions

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Everything comes from requirements.lock (exact versions, sha256-checked; torch's multi-GB CUDA
# wheels one at a time and without pip's cache, .ci/lock.py install), so a new upstream
# release never changes what a fresh clone gets; then unipred itself, editable, whose declared
# requirements the check below proves are all in the lock (pip finds them installed).
$(VENV)/.installed: requirements.lock pyproject.toml .ci/lock.py | $(BIN)/python
	$(BIN)/python .ci/lock.py install
	$(BIN)/python .ci/lock.py check
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

# The environment alone (what `make test` / `make demo` build first), for your own commands.
install: $(VENV)/.installed

# Refresh the lock on purpose: re-resolve pyproject.toml's ranges against today's releases.
# Then run `make test` and the demos, and commit requirements.lock with what they measured.
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q packaging
	$(BIN)/python .ci/lock.py write

check-lock: $(VENV)/.installed
	$(BIN)/python .ci/lock.py check

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

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the core's layers and its modality-free imports (pyproject.toml)

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# One pytest worker per usable core (pytest-xdist), each test file on one worker so a file's
# module fixtures are built once; TEST_JOBS=1 runs everything in this process.
TEST_JOBS ?= auto
test: system-test $(VENV)/.installed lint
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

demo: system-demo $(VENV)/.installed
	$(BIN)/unipred demo image

demo-quick: system-demo $(VENV)/.installed
	$(BIN)/unipred demo image --quick

# Another torch family than the lock's, in a venv of its own (.venv-torchX; not part of `make
# test` or CI): `make test-versions TORCH=2.11.0` runs the checkpoint-safety and fault tests
# on the GPU image's family; TESTS="tests/test_x.py -q" picks other pytest arguments.
TORCH ?= 2.11.0
test-versions:
	bash .ci/test_versions.sh $(TORCH) $(TESTS)

clean:
	rm -rf $(VENV) .venv-torch* runs .pytest_cache .ruff_cache
