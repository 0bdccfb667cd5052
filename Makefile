# nora-edge: two commands do everything on a fresh machine.
#   make demo   - fresh venv, install, build the tiny NORA, run the main job, print where the report went
#   make test   - fresh venv (if missing), install, run the test suite (CI runs exactly this)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format bench-ci bench-ci-baseline export-real bench-real fixture-real soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,bench,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nora-edge demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=7200

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# --- CI latency/memory gate: tiny NORA-Long bundle, normalized by an in-run yardstick (< 1 min) ------------
CI_BENCH = $(VENV)/bin/nora-edge bench $(OUT)/ci/bundle --steps 200 --warmup 20 --threads 1 --no-plots --out $(OUT)/ci/bench --against bench/baselines/ci.json

$(OUT)/ci/bundle: $(STAMP)
	rm -rf $(OUT)/ci
	$(VENV)/bin/nora-edge tiny $(OUT)/ci/ckpt --preset tiny --horizon 5 --seed 0
	$(VENV)/bin/nora-edge export $(OUT)/ci/ckpt --out $(OUT)/ci/bundle --no-validate

bench-ci: $(OUT)/ci/bundle
	$(CI_BENCH) --max-regression 0.15

bench-ci-baseline: $(OUT)/ci/bundle
	$(CI_BENCH) --update-baseline

# --- scale runs: a person runs these, never CI (they write ~7.5 GB and take long) ---------------------
fixture-real: $(STAMP)
	/usr/bin/time -v $(VENV)/bin/nora-edge tiny $(OUT)/nora-real-shape --preset real-shape --horizon 5 2> $(OUT)/fixture-real.time
	grep -E "Maximum resident|Elapsed" $(OUT)/fixture-real.time

export-real: fixture-real
	/usr/bin/time -v $(VENV)/bin/nora-edge export $(OUT)/nora-real-shape --out $(OUT)/bundle-real-fp32 --precision fp32 2> $(OUT)/export-real.time
	grep -E "Maximum resident|Elapsed" $(OUT)/export-real.time

bench-real: export-real
	/usr/bin/time -v $(VENV)/bin/nora-edge quantize $(OUT)/bundle-real-fp32 --out $(OUT)/bundle-real-int8 --recipe int8 2> $(OUT)/quant-real-int8.time
	/usr/bin/time -v $(VENV)/bin/nora-edge quantize $(OUT)/bundle-real-fp32 --out $(OUT)/bundle-real-int4 --recipe int4 2> $(OUT)/quant-real-int4.time
	grep -E "Maximum resident|Elapsed" $(OUT)/quant-real-*.time
	for b in fp32 int8 int4; do $(VENV)/bin/nora-edge bench $(OUT)/bundle-real-$$b --steps 5 --warmup 1 --out $(OUT)/bench-real-$$b; done
	$(PY) -m nora_edge.bench.baseline7b $(OUT)/bench-real-baseline7b

soak: $(OUT)/ci/bundle
	$(PY) -m nora_edge.bench.soak $(OUT)/ci/bundle --steps 10000 --out $(OUT)/soak

clean:
	rm -rf $(OUT) build *.egg-info .pytest_cache .ruff_cache
