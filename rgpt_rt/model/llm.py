"""The LLM of the reference model: transformers' LlamaForCausalLM, and the mapping between
rgpt_rt's LLMConfig and HF's LlamaConfig (both directions)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rgpt_rt.config import LLMConfig


def llama_config(cfg: LLMConfig) -> LlamaConfig:
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.rope_scaling is not None:
        kwargs["rope_scaling"] = dict(cfg.rope_scaling)
    return LlamaConfig(**kwargs)


def read_llama_config(folder: Path) -> LLMConfig:
    """The LLMConfig of a local LLaMA/Vicuna folder (config.json as transformers writes it)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; give the folder of a LLaMA/Vicuna model saved by transformers"
        )
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != "llama":
        raise ValueError(
            f"{folder} holds a {raw.get('model_type')!r} model; the LLM must be LLaMA-architecture (e.g. Vicuna-7B v1.5)"
        )
    # transformers 5 writes rope settings as rope_parameters; 4.x as rope_theta + rope_scaling.
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return LLMConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def build_llm(cfg: LLMConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(llama_config(cfg))


def hf_from_pretrained(model_class, folder: str | Path, dtype: torch.dtype | None = None):
    """`model_class.from_pretrained(folder)` offline, across transformers 4.x and 5.x."""
    import transformers

    kwargs = {"local_files_only": True}
    if dtype is not None:
        major = int(transformers.__version__.split(".")[0])
        kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    return model_class.from_pretrained(str(folder), **kwargs)
