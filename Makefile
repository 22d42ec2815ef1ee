# offload-bench. `make test`: CPU test suite. `make bench`: the scenario suite (GPU profile with CUDA, CPU profile
# without). Both install what they need on a fresh machine; torch is installed first as the CPU build so that pip
# never pulls CUDA wheels on a CPU box, and a box that already has torch (a GPU box) keeps its own.
PYTHON ?= python3
RESULTS ?= results
BENCH_ARGS ?=
RUN ?= $(lastword $(sort $(wildcard $(RESULTS)/runs/*)))
BASELINES ?=
# SGLang releases whose real ServerArgs and layerwise manager the harness runs (harness.engine.install: each in its
# own folder under $$OFFLOAD_BENCH_CACHE/sglang, no CUDA packages, kept between runs). OFFLOAD_BENCH_SGLANG=0 skips.
SGLANG ?= 0.5.8 0.5.13 0.5.23

.PHONY: deps test lint bench report list

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -c "import diffusers, transformers, safetensors, tabulate, matplotlib, pynvml, pytest_benchmark, hypothesis, ruff, xdist, yaml" \
		2>/dev/null || $(PYTHON) -m pip install -q -e '.[dev]'
	@if [ "$${OFFLOAD_BENCH_SGLANG:-1}" != 0 ]; then $(PYTHON) -m harness.engine.install $(SGLANG); fi

lint: deps
	$(PYTHON) -m ruff check harness scenarios tests experiments

test: lint
	$(PYTHON) -m pytest tests -q -p no:cacheprovider

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
