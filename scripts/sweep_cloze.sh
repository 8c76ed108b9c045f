#!/usr/bin/env bash
# The cloze commonsense table's sweep (conf/experiment/commonsense_cloze.yaml), resumable: completed runs are skipped,
# an unfinished one resumes from its last checkpoint (trainer.resume=auto). One thread: the sweep shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
DIR=results/repro/commonsense_cloze
$PY -m talklora_exp -m experiment=commonsense_cloze method=none seed=1 trainer.progress=false hydra.sweep.dir=$DIR
$PY -m talklora_exp -m experiment=commonsense_cloze trainer.progress=false hydra.sweep.dir=$DIR
