# offload-bench. `make test`: the fast CPU tests. `make test-e2e`: the slower end-to-end tests (marked `slow`).
# `make bench`: the scenario suite (GPU profile with CUDA, CPU profile without). On a fresh machine each target first
# makes `.venv` (a virtual environment without system site-packages) and installs the exact versions of
# constraints.txt, torch first as the CPU build so that pip never pulls CUDA wheels on a CPU box.
# PYTHON=/path/to/python uses that interpreter instead (a GPU box keeping its CUDA torch: an installed torch stays).
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
TORCH ?= torch==2.13.0
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine whose package index serves CUDA builds only
TORCH_INDEX ?=
CONSTRAINTS ?= constraints.txt
RESULTS ?= results
BENCH_ARGS ?=
TEST_ARGS ?=
RUN ?= $(lastword $(sort $(wildcard $(RESULTS)/runs/*)))
BASELINES ?=
# SGLang releases whose real ServerArgs and layerwise manager the harness runs (harness.engine.install: each in its
# own folder under $$OFFLOAD_BENCH_CACHE/sglang, sealed from this environment, kept between runs). Optional:
# OFFLOAD_BENCH_SGLANG=0 skips them, and a scenario that needs a missing one is skipped with the install command.
SGLANG ?= 0.5.8 0.5.13 0.5.23

.PHONY: deps deps-latest test test-e2e lint bench report list

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Every call checks the pins (a second, standard library only) and installs only when something differs.
deps: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PYTHON) .ci/pins.py check $(CONSTRAINTS) 2>/dev/null || $(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	@$(PYTHON) .ci/pins.py check $(CONSTRAINTS)
	@if [ "$${OFFLOAD_BENCH_SGLANG:-1}" != 0 ]; then $(PYTHON) -m harness.engine.install $(SGLANG); fi

# Today's newest version of every dependency in a throwaway environment: what differs from the pins and whether
# the fast tests still pass (.ci/latest-deps). Exits 1 when they do not; the pins stay as they are.
deps-latest:
	bash .ci/latest-deps

lint: deps
	$(PYTHON) -m ruff check harness scenarios tests experiments

test: lint
	$(PYTHON) -m pytest tests -q -p no:cacheprovider -m "not slow" $(TEST_ARGS)

test-e2e: deps
	$(PYTHON) -m pytest tests -q -p no:cacheprovider -m slow $(TEST_ARGS)

# Records, cell logs and pytest-benchmark's JSON all go to $(RESULTS)/runs/<run id>/ (ignored by git).
bench: deps
	@mkdir -p $(RESULTS)
	$(PYTHON) -m pytest scenarios -p no:cacheprovider -rA --bench-results $(RESULTS) $(BENCH_ARGS)

# Markdown report plus PNG plots (peak vs denoise latency with the Pareto front; memory over time) in the run folder,
# or beside a records file named after it (x.records.jsonl -> x.report.md), and the same as one self-contained
# HTML page (report.html / x.report.html: summary first, sortable tables, plots inline).
report: deps
	@test -n "$(RUN)" || { echo "no run under $(RESULTS)/runs: pass RUN=<run folder or records.jsonl>" >&2; exit 2; }
	$(PYTHON) -m harness report $(RUN) --write --html

# Write/refresh results/baselines/<gpu sku>.json from $(RUN) (SKU=... picks one when a run mixes SKUs). The CPU
# profile's cpu.json is this machine's own and ignored by git; GPU baselines are committed.
.PHONY: baseline compare
baseline: deps
	@test -n "$(RUN)" || { echo "no run under $(RESULTS)/runs: pass RUN=<run folder or records.jsonl>" >&2; exit 2; }
	$(PYTHON) -m harness baseline $(RUN) $(if $(SKU),--sku $(SKU)) $(if $(BASELINES),--baselines-dir $(BASELINES))

# Compare $(RUN) with its SKU's baseline: table on stdout, compare.md and github-action-benchmark JSON in the run
# folder (or beside a records file: x.compare.md, x.benchmark.json). harness compare exits 1 on a regression and
# 3-7 when it could judge nothing (README, "Baselines and compare"), but GNU make turns any failing recipe into its
# own exit 2: the recipe prints the real code, and a gate that needs the code runs `python -m harness compare`.
compare: deps
	@test -n "$(RUN)" || { echo "no run under $(RESULTS)/runs: pass RUN=<run folder or records.jsonl>" >&2; exit 2; }
	@$(PYTHON) -m harness compare $(RUN) $(if $(SKU),--sku $(SKU)) $(if $(BASELINES),--baselines-dir $(BASELINES)) \
		--write; rc=$$?; [ $$rc -eq 0 ] || echo "make compare: harness compare exited $$rc (make itself exits 2 on \
	any failure; for the code run: $(PYTHON) -m harness compare $(RUN)$(if $(SKU), --sku $(SKU))$(if $(BASELINES), \
	--baselines-dir $(BASELINES)) --write)" >&2; exit $$rc

list: deps
	$(PYTHON) -m harness list
