"""talklora-exp: LoRA vs MoELoRA vs TalkLoRA under equal parameter budgets (arXiv 2604.06291).

Importing it registers TalkLoRA, MoELoRA and TeamLoRA with peft (see `talklora_exp.tuners`)."""

from .tuners import MoELoRAConfig, TalkLoRAConfig, TeamLoRAConfig

__version__ = "0.1.0"
__all__ = ["MoELoRAConfig", "TalkLoRAConfig", "TeamLoRAConfig"]
