# Sluice: the two commands are `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
CARGO ?= cargo
GUEST_DIR := target/test-guest

.PHONY: all deps guest build test demo bench fuzz fmt clippy clean

all: build

deps:
	@bash scripts/deps.sh

guest: deps
	@bash vm-images/test-guest/build.sh $(GUEST_DIR)

build: deps
	$(CARGO) build --workspace --release

fmt:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps guest
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

demo: deps guest
	$(CARGO) build --release -p api --bin sluice -p integration-tests --bin sluice-demo
	"$${CARGO_TARGET_DIR:-target}/release/sluice-demo"

bench: deps guest
	@bash scripts/bench.sh

fuzz:
	@bash scripts/fuzz.sh

clean:
	$(CARGO) clean
