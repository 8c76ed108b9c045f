"""Every closed set of config values, defined once: `validate.RULES` checks configs against these, and the code that
acts on a value checks the same set (for callers that bypass the config). The mixtures' own sets (`talk`,
`router_input`) live with their peft configs in `tuners/talklora.py`."""

SELECT_PROTOCOLS = ("val_from_train", "best_dev", "last")  # trainer.select
SELECT_METRICS = ("loss", "main")  # trainer.select_metric
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # trainer.mixed_precision
RESUME = (None, "auto")  # trainer.resume
MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")  # model.dtype
POOLING = ("cls", "mean")  # model.pooling
PAIR_ENCODINGS = ("cross", "siamese", "cosine")  # model.pair_encoding
TWO_TOWER = ("siamese", "cosine")  # the pair encodings that encode each sentence of a pair as its own row
PROMPT_TRUNCATION = ("left", "right")  # task.prompt_truncation
BUDGET_TYPES = ("none", "relative", "absolute")  # budget.type
LOGGER_MODES = ("offline", "online", "disabled")  # logger.mode (wandb)
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")  # method.adapter_dtype
ANSWER_FORMATS = ("label", "text")  # task.answer_format (generation multiple-choice sets)
PROMPT_STYLES = ("alpaca", "lm_eval")  # task.prompt_style
SCORINGS = ("generate", "options", "both")  # eval.scoring
OPTION_METRICS = ("acc", "acc_norm")  # what eval.scoring=options reports (lm-eval's names)
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")  # trainer.strategy (ddp: accelerate's default with several processes)
QUANTIZATIONS = (None, "nf4", "int8")  # model.quantization (bitsandbytes; causal LMs)
