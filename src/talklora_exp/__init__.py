"""talklora-exp: LoRA vs MoELoRA vs TalkLoRA under equal parameter budgets (arXiv 2604.06291)."""

__version__ = "0.1.0"
