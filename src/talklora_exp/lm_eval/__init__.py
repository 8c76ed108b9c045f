"""lm-evaluation-harness as a second, independent scorer of any run dir (`python -m talklora_exp.lm_eval --help`).

lm-eval's `peft=` argument calls `PeftModel.from_pretrained`, which cannot know this project's peft types; here the
run's model is rebuilt exactly as training built it (`evaluate.load_run`: the same model source and conversion, the
adapter loaded) and handed to lm-eval's own `HFLM`. `tasks/` ships task YAMLs for the 8 local LLM-Adapters
commonsense sets in both answer formats, read from `$TALKLORA_DATA_DIR`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
