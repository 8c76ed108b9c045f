"""Peak GPU memory estimate of a training job, before launch (printed by the dry run; checked against
`torch.cuda.max_memory_allocated` by the GPU bench). A first-order model, stated so a user can check it:

    weights      = base parameters x bytes(model.dtype)              (frozen; no grads, no optimizer state)
    adapters     = P x 16 bytes                                      (fp32 weights + grads + AdamW m and v)
    activations  = L x T x bytes(act) x (6h + 2h_kv + 4i)            (per layer: norms, q/k/v/o, MLP in/gate/up/down;
                                                                      SDPA attention keeps no T x T matrix)
                   with checkpointing: L x T x bytes(act) x h + one layer's full activations (recomputed in backward)
    logits       = T x V x 4 bytes x 2                               (fp32 logits and their gradient)
    total        = weights + adapters + activations + logits + 1 GiB (CUDA context, allocator slack)

T = batch_size x rows x sequence length (prompt + response cutoffs for generation, model.max_length for encoders;
rows = 2 for `model.pair_encoding=siamese` or `cosine`, which encodes each sentence of a pair as its own row, else 1), h the
hidden size, h_kv the key/value width, i the MLP width, V the vocabulary (the classifier width for encoders), L the
layers; bytes(act) = 2 under bf16/fp16 autocast or a half-precision base, else 4.
"""

from __future__ import annotations

from typing import Any

import torch

from .choices import TWO_TOWER

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def gpu_dtype(requested: str) -> str:
    """What `model.dtype=auto` means on a GPU (bf16: every GPU the paper setting targets supports it)."""
    return "bf16" if requested == "auto" else requested


def estimate_memory(cfg: Any, model: torch.nn.Module, adapter_params: int, task: Any) -> dict[str, Any]:
    conf = model.config
    h = int(conf.hidden_size)
    L = int(conf.num_hidden_layers)
    heads = int(conf.num_attention_heads)
    kv = int(getattr(conf, "num_key_value_heads", None) or heads)
    i = int(getattr(conf, "intermediate_size", 4 * h))
    V = int(conf.vocab_size) if task.kind == "causal" else max(int(task.num_labels), 1)
    seq = (
        int(cfg.task.prompt_max_length) + int(cfg.task.response_max_length)
        if task.kind == "causal"
        else int(cfg.model.max_length)
    )
    rows = 2 if task.kind != "causal" and str(cfg.model.get("pair_encoding", "cross")) in TWO_TOWER else 1
    tokens = int(cfg.trainer.batch_size) * rows * seq
    wdtype = gpu_dtype(str(cfg.model.get("dtype", "auto")))
    wbytes = DTYPE_BYTES[wdtype]
    half = wbytes == 2 or str(cfg.trainer.mixed_precision) in ("auto", "bf16", "fp16")
    abytes = 2 if half else 4
    n_base = sum(p.numel() for p in model.parameters())
    per_layer_token = abytes * (6 * h + 2 * h * kv // heads + 4 * i)
    full = L * tokens * per_layer_token
    ckpt = L * tokens * abytes * h + tokens * per_layer_token
    logits = tokens * V * 4 * 2
    fixed = n_base * wbytes + adapter_params * 16 + logits + GiB
    on = bool(cfg.trainer.get("gradient_checkpointing", False))
    total, alt = fixed + (ckpt if on else full), fixed + (full if on else ckpt)
    return {
        "checkpointing": on,
        "weights_gb": n_base * wbytes / GiB,
        "adapters_gb": adapter_params * 16 / GiB,
        "activations_gb": (ckpt if on else full) / GiB,
        "logits_gb": logits / GiB,
        "total_gb": total / GiB,
        "alt_total_gb": alt / GiB,
        "tokens_per_step": tokens,
        "base_dtype": wdtype,
    }
