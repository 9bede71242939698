"""Reading a transformers LLaMA folder without transformers: config.json -> LLMConfig (json only)
and model.safetensors, or its shards, -> HF-named tensors (safetensors only).
Agrees with rgpt_rt.model.llm.read_llama_config, which the reference model uses (tested)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from rgpt_rt.config import LLMConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def llm_config_from_hf(raw: Mapping[str, Any]) -> LLMConfig:
    """The LLMConfig of a transformers LLaMA config.json (4.x or 5.x layout)."""
    if raw.get("model_type") != "llama":
        raise ValueError(
            f"config.json describes a {raw.get('model_type')!r} model; the runtime decoder runs "
            "LLaMA-architecture models (model_type 'llama', e.g. Vicuna-7B v1.5)"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not LLaMA's 'silu'")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias are not supported: LLaMA linears have no bias")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if head_dim * heads != raw["hidden_size"]:
        raise ValueError(
            f"head_dim {head_dim} x {heads} heads != hidden_size {raw['hidden_size']}; "
            "the runtime decoder needs head_dim = hidden_size / num_attention_heads"
        )
    # transformers 5 writes rope settings as rope_parameters; 4.x as rope_theta + rope_scaling.
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None and rope_type(scaling) == "default":
        scaling = None
    if rope_type(scaling) not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type(scaling)!r} is not supported; the decoder runs {ROPE_TYPES}"
        )
    return LLMConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def read_llm_config(folder: str | Path) -> LLMConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; give a LLaMA folder saved by transformers"
        )
    return llm_config_from_hf(json.loads(path.read_text()))


def read_hf_tensors(
    folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Every tensor of model.safetensors (or of the shards listed in model.safetensors.index.json),
    by its HF name, cast to `dtype` and moved to `device` one tensor at a time."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} has neither model.safetensors nor model.safetensors.index.json"
        )
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as shard:
            for key in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = shard.get_tensor(key)
                tensors[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
    return tensors


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))
