"""Plain LoRA through peft (LoraConfig / get_peft_model); the task head is trained and saved with the adapter."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from .base import Method, TargetLayer, find_target_layers


class LoRAMethod(Method):
    name = "lora"
    use_dora = False

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) for t in layers)

    def _peft_config(self, targets: list[str], head_modules: list[str], task_kind: str):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.resolved_alpha(),
            lora_dropout=self.cfg.dropout,
            target_modules=list(targets),
            modules_to_save=list(head_modules) or None,
            task_type={"seq_cls": TaskType.SEQ_CLS, "causal": TaskType.CAUSAL_LM}.get(task_kind),  # None: a bare module
            use_dora=self.use_dora,
        )

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        from peft import get_peft_model

        find_target_layers(model, targets)  # the clear error when nothing matches
        # peft keeps adapters in fp32 on a half-precision base unless asked not to (adapter_dtype)
        autocast = self.cfg.adapter_dtype == "fp32"
        return get_peft_model(
            model, self._peft_config(targets, head_modules, task_kind), autocast_adapter_dtype=autocast
        )

    def adapter_param_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters() if "lora_" in n]

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))  # adapter_model.safetensors + adapter_config.json (peft format)

    def load(self, model: nn.Module, in_dir: Path) -> nn.Module:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        res = set_peft_model_state_dict(model, load_peft_weights(str(in_dir)))
        absent = [k for k in res.missing_keys if "lora_" in k]
        if res.unexpected_keys or absent:  # peft loads non-strictly: another method's adapter would load as nothing
            what = (
                f"unknown tensors {res.unexpected_keys[:3]}"
                if res.unexpected_keys
                else f"no saved value for {absent[:3]}"
            )
            raise UserError(f"{in_dir}: adapter does not fit this model/method config ({what})")
        return model


class DoRAMethod(LoRAMethod):
    """DoRA through peft (`use_dora=True`): LoRA's direction update plus a learned magnitude per output feature."""

    name = "dora"
    use_dora = True

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) + t.d_out for t in layers)
