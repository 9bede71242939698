"""A LLaMA folder on disk, read one tensor at a time and checked before any long work.

    source = LlamaSource.open("vicuna-7b-v1.5/")    # config.json + model.safetensors (or shards + index)
    source.config                                    # LLMConfig
    w = source.read("model.layers.0.self_attn.q_proj.weight", torch.float32)   # plain reads, no mmap

`open` checks what a long build would otherwise trip over halfway: a missing or truncated
shard, an index naming a tensor its shard lacks, a tensor whose shape disagrees with
config.json, a tensor the config needs that no shard holds. Each error names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rgpt_rt.config import LLMConfig
from rgpt_rt.runtime.hf_llama import read_llm_config
from rgpt_rt.safetensors_io import TensorEntry, read_header, read_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class Located:
    path: Path
    entry: TensorEntry
    data_start: int


def expected_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA of this config needs, by HF name, with its shape."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    return shapes


class LlamaSource:
    def __init__(self, folder: Path, config: LLMConfig, tensors: dict[str, Located]):
        self.folder, self.config, self.tensors = folder, config, tensors

    @classmethod
    def open(cls, folder: str | Path) -> LlamaSource:
        folder = Path(folder)
        config = read_llm_config(folder)
        tensors = _locate(folder)
        for name, shape in expected_shapes(config).items():
            found = tensors.get(name)
            if found is None:
                raise ValueError(
                    f"{folder}: no shard holds {name}, which config.json's model needs"
                )
            if tuple(found.entry.shape) != shape:
                raise ValueError(
                    f"{found.path}: {name} is {list(found.entry.shape)} but config.json "
                    f"({folder / 'config.json'}) implies {list(shape)}; the config and the "
                    "weights disagree"
                )
            if not found.entry.dtype.is_floating_point:
                raise ValueError(f"{found.path}: {name} is {found.entry.dtype}, not a float tensor")
        return cls(folder, config, tensors)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, read into fresh memory (cast to `dtype` when given)."""
        found = self.tensors[name]
        tensor = read_tensor(found.path, found.entry, found.data_start)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def nbytes(self) -> int:
        return sum(found.entry.nbytes for found in self.tensors.values())


def _locate(folder: Path) -> dict[str, Located]:
    """{name: where it is} over model.safetensors or the shards its index names, every shard
    checked to hold what its header and the index say."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index} is not a safetensors index ({error})") from None
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        weight_map, shards = None, [SINGLE]
    else:
        raise FileNotFoundError(f"{folder} has neither {SINGLE} nor {INDEX}")
    located: dict[str, Located] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (named by {INDEX})")
        try:
            entries, _, data_start = read_header(path)
        except (ValueError, OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
        size = path.stat().st_size
        for name, entry in entries.items():
            if data_start + entry.end > size:
                raise ValueError(
                    f"{path} is truncated: {name} ends at byte {data_start + entry.end} "
                    f"but the file has {size}; download or copy the shard again"
                )
            located[name] = Located(path, entry, data_start)
    for name, shard in (weight_map or {}).items():
        if name not in located or located[name].path.name != shard:
            raise ValueError(f"{INDEX} puts {name} in {shard}, which does not hold it")
    return located
