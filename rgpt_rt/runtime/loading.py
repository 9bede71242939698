"""Loading the runtime decoder: HF-named tensors -> LlamaDecoder, INT4 linears swapped in,
q/k/v and gate/up fused for inference.

    decoder = load_decoder("vicuna-7b/", dtype=torch.float16, device="cuda")        # an HF folder
    decoder = decoder_from_state(config, tensors, int4_weights={...})              # tensors in memory
    decoder = load_bundle_decoder(bundle_folder, config, dtype, device)            # a bundle's llm.safetensors

Names are HF's ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"); the decoder's
are the same without "model.". No transformers: hf_llama.py reads folders with json and
safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rgpt_rt.bundle import LLM_FILE
from rgpt_rt.config import LLMConfig
from rgpt_rt.ops.int4_format import Int4Weight, split_int4_tensors
from rgpt_rt.runtime.hf_llama import read_hf_tensors, read_llm_config
from rgpt_rt.runtime.int4_linear import Int4Linear
from rgpt_rt.runtime.model import QUANTIZED_LINEARS, LlamaDecoder
from rgpt_rt.runtime.table_in_file import TableInFile
from rgpt_rt.safetensors_io import read_header, read_tensors

# stored in fp16 by a bundle, and kept so under fp32 activations (the rest is small)
HALF_TENSORS = ("embed_tokens.weight", "lm_head.weight")
EMBED_TENSOR = "model.embed_tokens.weight"  # its HF name, as a bundle stores it
# a CPU prefills long prompts in chunks of this many tokens (model.LlamaDecoder.prefill_chunk)
CPU_PREFILL_CHUNK = 128


def load_decoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    group_size: int = 128,
    device: str | torch.device = "cpu",
) -> LlamaDecoder:
    """Load a transformers LLaMA folder (config.json + model.safetensors, or shards with an
    index). quant="int4" quantizes q/k/v/o/gate/up/down with round-to-nearest INT4."""
    config = read_llm_config(path)
    tensors = read_hf_tensors(path, dtype=dtype, device=device)
    return decoder_from_state(
        config, tensors, dtype=dtype, quant=quant, group_size=group_size, device=device
    )


def decoder_from_state(
    config: LLMConfig,
    tensors: Mapping[str, Tensor],
    *,
    int4_weights: Mapping[str, Int4Weight] | None = None,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    group_size: int = 128,
    device: str | torch.device = "cpu",
    keep_half: bool = False,
    embed_file: TableInFile | None = None,
    where: str = "the weights",
) -> LlamaDecoder:
    """Build from HF-named tensors. int4_weights: already-quantized linears by HF module name
    ("model.layers.0.mlp.up_proj" -> Int4Weight), e.g. from a bundle's llm.safetensors; those
    need no fp tensor. Linears may come stacked (self_attn.qkv_proj, mlp.gate_up_proj), as a
    bundle stores them. quant="int4": the remaining q/k/v/o/gate/up/down linears by RTN.
    keep_half: fp16 embed_tokens / lm_head stay fp16 under fp32 activations (half the memory).
    embed_file: the embedding table, left in its file (then not among `tensors`).
    `where` names the weights' file in errors."""
    if quant not in (None, "int4"):
        raise ValueError(f"quant {quant!r} is unknown; use None or 'int4'")
    int4_weights = {_runtime_name(k): w for k, w in (int4_weights or {}).items()}
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # saved by old transformers; recomputed here
            continue
        name = _runtime_name(name)
        half = keep_half and tensor.dtype == torch.float16 and name in HALF_TENSORS
        state[name] = tensor.to(device=device, dtype=None if half else dtype)
    if (
        config.tie_word_embeddings
        and "lm_head.weight" not in state
        and "embed_tokens.weight" in state
    ):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaDecoder(config)
        _stack_like(model, set(state) | {f"{n}.weight" for n in int4_weights})
    if embed_file is not None:
        _check_embed_file(config, embed_file, where)
        model.embed_tokens = None
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {n for n in model.state_dict() if n.rsplit(".", 1)[0] not in int4_weights}
    missing, unknown = expected - set(state), set(state) - set(model.state_dict())
    if missing or unknown:
        raise ValueError(
            f"{where} do not fit config.json's LLaMA: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unknown)[:8]} (names are HF's, e.g. model.layers.0.self_attn.q_proj.weight)"
        )
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{where}: {name} is {list(tensor.shape)} but config.json implies "
                f"{list(params[name].shape)}; the files disagree: rebuild the bundle"
            )
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.embed_file = embed_file
    for name, weight in int4_weights.items():
        shape = tuple(params[f"{name}.weight"].shape)
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"{where}: INT4 {name} is {list(weight.shape)} but config.json implies "
                f"{list(shape)}; the files disagree: rebuild the bundle"
            )
        _replace(model, name, Int4Linear(weight).to(device))
    if quant == "int4":
        quantize_int4(model, group_size)
    if torch.device(device).type == "cpu":
        model.prefill_chunk = CPU_PREFILL_CHUNK
    model.rope_cos = torch.empty(0, config.head_dim, dtype=dtype, device=device)
    model.rope_signed_sin = torch.empty(0, config.head_dim, dtype=dtype, device=device)
    return model.eval()


def _check_embed_file(config: LLMConfig, table: TableInFile, where: str) -> None:
    shape = (config.vocab_size, config.hidden_size)
    if config.tie_word_embeddings or tuple(table.shape) != shape:
        raise ValueError(
            f"{where}: {table.name} is {list(table.shape)} but config.json implies {list(shape)}"
            + (" (and lm_head shares it)" if config.tie_word_embeddings else "")
            + "; the files disagree: rebuild the bundle"
        )
    if not table.dtype.is_floating_point:
        raise ValueError(f"{where}: {table.name} is {table.dtype}; rebuild the bundle")


def _stack_like(model: LlamaDecoder, names: set[str]) -> None:
    """Give the (meta) layers whose weights come stacked their stacked linears."""
    for i, layer in enumerate(model.layers):
        for part, stacked, parts in (
            (layer.self_attn, "self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
            (layer.mlp, "mlp.gate_up_proj", ("gate_proj", "up_proj")),
        ):
            if f"layers.{i}.{stacked}.weight" in names:
                linears = [getattr(part, p) for p in parts]
                rows = sum(m.out_features for m in linears)
                part.fuse(nn.Linear(linears[0].in_features, rows, bias=False))


def quantize_int4(decoder: LlamaDecoder, group_size: int = 128) -> None:
    """Replace every q/k/v/o/gate/up/down linear still in floating point by an Int4Linear (RTN)."""
    for name, module in list(decoder.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
            _replace(decoder, name, Int4Linear.from_linear(module, group_size))


def load_bundle_decoder(
    folder: Path, config: LLMConfig, dtype: torch.dtype, device: torch.device
) -> LlamaDecoder:
    """The decoder of a bundle's llm.safetensors (INT4 linears in the kernels' layout, q/k/v
    and gate/up stacked, the rest fp16; a file without INT4 weights is a plain LLM). Each tensor
    is read once, straight to `device`; nothing of the file stays mapped. fp16 embeddings and
    lm_head stay fp16 under fp32 activations. On a CPU the embedding table (unless lm_head
    shares it) stays in the file and its rows are read when used (table_in_file.py)."""
    path = folder / LLM_FILE
    where = f"{folder.name}/{LLM_FILE}"
    entries, metadata, _ = read_header(path)
    embed_file = None
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and not config.tie_word_embeddings and EMBED_TENSOR in entries:
        embed_file = TableInFile(path, EMBED_TENSOR)
    names = {name for name in entries if embed_file is None or name != EMBED_TENSOR}
    tensors = read_tensors(path, device, names=names)
    int4, rest = split_int4_tensors(tensors, metadata, where=where)
    del tensors
    decoder = decoder_from_state(
        config, rest, int4_weights=int4, dtype=dtype, device=device, keep_half=True,
        embed_file=embed_file, where=where,
    )  # fmt: skip
    decoder.fuse_projections()  # layers a bundle did not store stacked
    if int4:
        decoder.kv_dtype = torch.float16  # weights already 4-bit: the cache in fp16 too
    return decoder


def _runtime_name(hf_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'layers.0.mlp.up_proj.weight'; lm_head is unchanged."""
    return hf_name.removeprefix("model.")


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
