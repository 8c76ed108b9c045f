"""TalkLoRA, MoELoRA and TeamLoRA as peft tuners, registered with peft when `talklora_exp` is imported, so
`get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` work with them in any Hugging Face pipeline.

peft's `register_peft_method` accepts only names in its closed `PeftType` enum, so the three are entered in peft's
type -> config / tuner / prefix mappings directly. That relies on those mapping names: pyproject pins the peft range
this is tested on, and `register()` fails with one clear line if they are gone.
"""

from __future__ import annotations

from .talklora import MoELoRAConfig, MoELoRAModel, TalkLoRAConfig, TalkLoRAModel
from .teamlora import TeamLoRAConfig, TeamLoRAModel

TUNERS = {  # peft type -> (config class, tuner class)
    "TALKLORA": (TalkLoRAConfig, TalkLoRAModel),
    "MOELORA": (MoELoRAConfig, MoELoRAModel),
    "TEAMLORA": (TeamLoRAConfig, TeamLoRAModel),
}
PEFT_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def register() -> None:
    """Enter the three tuners in peft's mappings (idempotent)."""
    import peft
    from peft import mapping

    missing = [m for m in PEFT_MAPPINGS if not isinstance(getattr(mapping, m, None), dict)]
    if missing:
        raise ImportError(
            f"talklora_exp registers its tuners in peft.mapping.{{{', '.join(missing)}}}, which peft "
            f"{peft.__version__} does not have; install a peft version in the range pyproject.toml pins"
        )
    for peft_type, (config_cls, tuner_cls) in TUNERS.items():
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix


register()

__all__ = ["TUNERS", "MoELoRAConfig", "TalkLoRAConfig", "TeamLoRAConfig", "register"]
