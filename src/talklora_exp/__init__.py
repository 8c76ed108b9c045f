"""talklora-exp: LoRA vs MoELoRA vs TalkLoRA under equal parameter budgets (arXiv 2604.06291).

Importing it registers TalkLoRA, MoELoRA and TeamLoRA with peft (see `talklora_exp.tuners`)."""

import logging
from typing import Any

# bitsandbytes (imported by peft when installed) tries to fetch an optional CPU kernel from the hub at import and logs
# its failure on every command, offline or not; it falls back to its own kernels, so the warning is only noise here.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .tuners import MoELoRAConfig, TalkLoRAConfig, TeamLoRAConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MoELoRAConfig", "TalkLoRAConfig", "TeamLoRAConfig", "routing_hooks"]


def routing_hooks(model: Any, balance_loss: float = 0.0) -> Any:
    """The mixtures' routing for your own training loop (what this project's trainer uses): create it before the first
    forward; per batch call `set_batch(batch)` (the padding mask), run the forward, add `aux_loss()` (the Switch
    balance loss of that forward's gates, weight `balance_loss`; None when 0) to the loss; `routing.start()` /
    `routing.stop()` around forwards give routing statistics. A gradient-checkpoint recompute is never counted."""
    from .methods.base import RoutedHooks
    from .tuners.mixture import mixture_layers

    return RoutedHooks(mixture_layers(model), float(balance_loss))
