# flotilla: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
CARGO ?= cargo
PYTHON ?= python3
PROMPT ?= Write a haiku about the ocean.
IMAGE ?= flotilla:latest
FEATURES ?=

.PHONY: run demo test model build release docker test-deps fmt clippy

## Fetch the model, build, and serve: a 3-node local cluster (Ctrl-C stops it).
run: model release
	./target/release/flotilla up --nodes 3 --model $(MODEL)

## Answer one chat prompt in this process.
demo: model release
	./target/release/flotilla generate --model $(MODEL) --chat --prompt "$(PROMPT)" --max-tokens 64

## Everything: unit, integration and multi-process tests (fetches the model when missing).
test: model test-deps
	$(CARGO) nextest run --workspace --no-fail-fast

model: $(MODEL)

$(MODEL):
	bash scripts/fetch-model.sh

## Python packages the tests need: the independent reference forward (tests/reference) and the OpenAI client (tests/api.rs).
test-deps:
	@$(PYTHON) -c "import numpy, gguf" 2>/dev/null || $(PYTHON) -m pip install --quiet -r tests/reference/requirements.txt
	@$(PYTHON) -c "import openai" 2>/dev/null || $(PYTHON) -m pip install --quiet -r tests/requirements-api.txt

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p flotilla-node

## Container image $(IMAGE) from the release binary without its debug info (FEATURES=... builds it with cargo features); the
## Debian base image is built offline by docker/build-base.sh when docker does not have it. Then:
## docker compose -f docker/compose.yaml up
docker:
	$(CARGO) build --release -p flotilla-node $(if $(FEATURES),--features "$(FEATURES)")
	mkdir -p target/docker && objcopy --strip-debug target/release/flotilla target/docker/flotilla
	bash docker/build-base.sh
	docker build -f docker/Dockerfile --build-arg BINARY=target/docker/flotilla --build-arg FEATURES="$(FEATURES)" -t $(IMAGE) .

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
