"""Random-weight model folders in the real layouts, for memory benchmarks and tests (nothing
is downloaded; speed and memory do not depend on the values).

    write_clip_folder("clip/", layers=None)          # openai/clip-vit-large-patch14-336's config and names
    write_llama_folder("llm/", layers=None, shards=2) # lmsys/vicuna-7b-v1.5's config and names
    write_llama_folder("llm/", layers=2)             # real widths, 2 layers (CI)

Weights are fp16 N(0, 0.02), written one tensor at a time into HF-named safetensors shards
with an index (the shards split at layer boundaries, as transformers writes them), so a 7B
folder (13.5 GB) is written in bounded memory. A small byte-level tokenizer.json (rgpt_rt's
own, with <s>, </s> and the prompt words; ids far below 32000) is written beside the LLM, so the
exporter needs no sentencepiece; its ids differ from LLaMA's, which random weights do not mind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rgpt_rt.safetensors_io import SafetensorsWriter, TensorEntry

STD = 0.02

VICUNA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}

CLIP_L_336 = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "clip_text_model",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
    },
}
CLIP_PREPROCESSOR = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}


def llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a LlamaForCausalLM, in layer order."""
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = D // config["num_attention_heads"] * config["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (D, D)),
            (p + "self_attn.k_proj.weight", (kv, D)),
            (p + "self_attn.v_proj.weight", (kv, D)),
            (p + "self_attn.o_proj.weight", (D, D)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
            (p + "input_layernorm.weight", (D,)),
            (p + "post_attention_layernorm.weight", (D,)),
        ]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return out


def clip_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a CLIPModel (vision, text, projections)."""
    out = []
    for tower, cfg in (
        ("vision_model", config["vision_config"]),
        ("text_model", config["text_config"]),
    ):
        C, F = cfg["hidden_size"], cfg["intermediate_size"]
        if tower == "vision_model":
            grid = cfg["image_size"] // cfg["patch_size"]
            out += [
                (f"{tower}.embeddings.class_embedding", (C,)),
                (
                    f"{tower}.embeddings.patch_embedding.weight",
                    (C, 3, cfg["patch_size"], cfg["patch_size"]),
                ),
                (f"{tower}.embeddings.position_embedding.weight", (grid * grid + 1, C)),
                (f"{tower}.pre_layrnorm.weight", (C,)),
                (f"{tower}.pre_layrnorm.bias", (C,)),
            ]
        else:
            out += [
                (f"{tower}.embeddings.token_embedding.weight", (cfg["vocab_size"], C)),
                (
                    f"{tower}.embeddings.position_embedding.weight",
                    (cfg["max_position_embeddings"], C),
                ),
            ]
        for i in range(cfg["num_hidden_layers"]):
            p = f"{tower}.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out += [
                    (p + f"self_attn.{proj}.weight", (C, C)),
                    (p + f"self_attn.{proj}.bias", (C,)),
                ]
            out += [
                (p + "layer_norm1.weight", (C,)), (p + "layer_norm1.bias", (C,)),
                (p + "mlp.fc1.weight", (F, C)), (p + "mlp.fc1.bias", (F,)),
                (p + "mlp.fc2.weight", (C, F)), (p + "mlp.fc2.bias", (C,)),
                (p + "layer_norm2.weight", (C,)), (p + "layer_norm2.bias", (C,)),
            ]  # fmt: skip
        norm = "post_layernorm" if tower == "vision_model" else "final_layer_norm"
        out += [(f"{tower}.{norm}.weight", (C,)), (f"{tower}.{norm}.bias", (C,))]
    projection = config["projection_dim"]
    out += [
        ("visual_projection.weight", (projection, config["vision_config"]["hidden_size"])),
        ("text_projection.weight", (projection, config["text_config"]["hidden_size"])),
        ("logit_scale", ()),
    ]
    return out


def write_llama_folder(
    folder: str | Path, layers: int | None = None, shards: int = 2, seed=0
) -> Path:
    """Vicuna-7B v1.5's config (with `layers` decoder layers when given) and random weights."""
    config = dict(VICUNA_7B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_shards(folder, llama_tensors(config), shards, seed)
    _write_llama_tokenizer(folder, config["vocab_size"])
    return folder


def write_clip_folder(folder: str | Path, layers: int | None = None, seed=1) -> Path:
    """clip-vit-large-patch14-336's config (both towers `layers` deep when given) and weights."""
    config = json.loads(json.dumps(CLIP_L_336))
    if layers is not None:
        config["vision_config"]["num_hidden_layers"] = layers
        config["text_config"]["num_hidden_layers"] = layers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    _write_shards(folder, clip_tensors(config), 1, seed, single="model.safetensors")
    return folder


def _write_shards(folder: Path, tensors, shards: int, seed: int, single: str | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    total = sum(_numel(shape) for _, shape in tensors)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    written = 0
    for name, shape in tensors:  # split by size, never inside a layer's run of tensors
        groups[min(shards - 1, written * shards // total)].append((name, shape))
        written += _numel(shape)
    groups = [g for g in groups if g]
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        file = single or f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        entries = [TensorEntry(name, torch.float16, shape) for name, shape in group]
        with SafetensorsWriter(folder / file, entries, {"format": "pt"}) as writer:
            for name, shape in group:
                value = torch.randn(shape, generator=generator).mul_(STD).to(torch.float16)
                if name.endswith(
                    ("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")
                ):
                    value = torch.ones(shape, dtype=torch.float16)  # norms as trained models start
                writer.write(name, value)
                weight_map[name] = file
    if single is None:
        index = {
            "metadata": {"total_size": 2 * sum(_numel(s) for _, s in tensors)},
            "weight_map": weight_map,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_llama_tokenizer(folder: Path, vocab_size: int) -> None:
    """rgpt_rt's small default tokenizer: enough for prompts to tokenize."""
    from rgpt_rt.tokenizer import default_tokenizer

    tokenizer = default_tokenizer(vocab_size=min(vocab_size, 512))
    tokenizer.save(str(folder / "tokenizer.json"))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
