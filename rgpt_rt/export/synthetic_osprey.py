"""Random-weight Osprey folders and OpenCLIP ConvNeXt files in the public files' layouts (the
osprey-family twin of synthetic.py; nothing is downloaded, and speed and memory do not depend
on the values).

    write_osprey_folder("Osprey-7b/")                            # sunshine-lwt/Osprey-7b: config.json, tokenizer, pytorch_model-*.bin + index
    write_osprey_folder("o/", preset="osprey-narrow", fmt="safetensors")   # the narrow twin, safetensors shards
    write_convnext_file("open_clip_pytorch_model.bin")           # laion/CLIP-convnext_large_d_320...'s file: every tensor, text tower included

Names and shapes are those Osprey's and OpenCLIP's code give (docs/osprey.md): the LLaMA keys,
model.mm_projector.{0,2}.*, mask_extractor.* (an attribute of OspreyLlamaForCausalLM, so
without the model. prefix), and OpenCLIP's visual.trunk.* (timm ConvNeXt), visual.head.*,
and the text tower. The LLM is bf16 as Osprey trained and saved it, the OpenCLIP file fp32.
`.bin` shards are written with torch.save one shard at a time (a shard is held in memory
while it is written: `shards` bounds that). `tower_in_shards` also writes the vision tower
into the Osprey shards under model.vision_tower.vision_tower.visual.*, as a checkpoint that
saved its frozen tower would hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rgpt_rt.config import ConvNeXtConfig, RGPTConfig
from rgpt_rt.export.synthetic import VICUNA_7B, llama_tensors
from rgpt_rt.model.osprey_checkpoint import osprey_shapes
from rgpt_rt.safetensors_io import SafetensorsWriter, TensorEntry

STD = 0.02
CONVNEXT_FILE = "open_clip_pytorch_model.bin"
# OpenCLIP's convnext_large_d_320: the text tower and the heads around the trunk.
OPENCLIP_TEXT = {"width": 768, "layers": 16, "vocab": 49408, "context": 77, "embed_dim": 768}
OSPREY_FIELDS = {  # what Osprey's training adds to Vicuna's config.json (osprey/train/train.py)
    "architectures": ["OspreyLlamaForCausalLM"],
    "model_type": "osprey",
    "mm_vision_tower": "./laion_clip_convnext_large_d_320/open_clip_pytorch_model.bin",
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "use_mm_proj": True,
    "torch_dtype": "bfloat16",
}


def osprey_hf_config(config: RGPTConfig) -> dict:
    """config.json of an Osprey folder with `config`'s LLM shapes."""
    llm = config.llm
    raw = dict(VICUNA_7B) | OSPREY_FIELDS
    raw.update(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
    )
    return raw


def convnext_trunk_tensors(cfg: ConvNeXtConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(timm name, shape) of a ConvNeXt trunk, head norm included, in module order."""
    d = cfg.dims
    out = [
        ("stem.0.weight", (d[0], 3, 4, 4)),
        ("stem.0.bias", (d[0],)),
        ("stem.1.weight", (d[0],)),
        ("stem.1.bias", (d[0],)),
    ]
    for i, (depth, dim) in enumerate(zip(cfg.depths, d)):
        if i > 0:
            out += [
                (f"stages.{i}.downsample.0.weight", (d[i - 1],)),
                (f"stages.{i}.downsample.0.bias", (d[i - 1],)),
                (f"stages.{i}.downsample.1.weight", (dim, d[i - 1], 2, 2)),
                (f"stages.{i}.downsample.1.bias", (dim,)),
            ]
        hidden = cfg.mlp_ratio * dim
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            out += [
                (p + "gamma", (dim,)),
                (p + "conv_dw.weight", (dim, 1, 7, 7)),
                (p + "conv_dw.bias", (dim,)),
                (p + "norm.weight", (dim,)),
                (p + "norm.bias", (dim,)),
                (p + "mlp.fc1.weight", (hidden, dim)),
                (p + "mlp.fc1.bias", (hidden,)),
                (p + "mlp.fc2.weight", (dim, hidden)),
                (p + "mlp.fc2.bias", (dim,)),
            ]
    out += [("head.norm.weight", (d[3],)), ("head.norm.bias", (d[3],))]
    return out


def openclip_tensors(cfg: ConvNeXtConfig, text: dict | None = None) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of OpenCLIP's convnext_large_d_320 checkpoint (at `cfg`'s
    trunk widths), in its state-dict order."""
    text = text or OPENCLIP_TEXT
    w, embed, width5 = text["width"], text["embed_dim"], cfg.dims[3]
    out = [
        ("positional_embedding", (text["context"], w)),
        ("text_projection", (w, embed)),
        ("logit_scale", ()),
    ]
    out += [("visual.trunk." + n, s) for n, s in convnext_trunk_tensors(cfg)]
    out += [
        ("visual.head.mlp.fc1.weight", (width5, width5)),
        ("visual.head.mlp.fc1.bias", (width5,)),
        ("visual.head.mlp.fc2.weight", (embed, width5)),  # no bias (timm_proj_bias False)
        ("token_embedding.weight", (text["vocab"], w)),
    ]
    for i in range(text["layers"]):
        p = f"transformer.resblocks.{i}."
        out += [
            (p + "ln_1.weight", (w,)), (p + "ln_1.bias", (w,)),
            (p + "attn.in_proj_weight", (3 * w, w)), (p + "attn.in_proj_bias", (3 * w,)),
            (p + "attn.out_proj.weight", (w, w)), (p + "attn.out_proj.bias", (w,)),
            (p + "ln_2.weight", (w,)), (p + "ln_2.bias", (w,)),
            (p + "mlp.c_fc.weight", (4 * w, w)), (p + "mlp.c_fc.bias", (4 * w,)),
            (p + "mlp.c_proj.weight", (w, 4 * w)), (p + "mlp.c_proj.bias", (w,)),
        ]  # fmt: skip
    out += [("ln_final.weight", (w,)), ("ln_final.bias", (w,))]
    return out


def osprey_tensors(config: RGPTConfig, tower_in_shards: bool = False) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of an Osprey checkpoint, in the order it saves them."""
    llama = llama_tensors(osprey_hf_config(config))
    own = osprey_shapes(config)
    projector = [("model." + n, s) for n, s in own.items() if n.startswith("mm_projector.")]
    extractor = [(n, s) for n, s in own.items() if n.startswith("mask_extractor.")]
    tower = []
    if tower_in_shards:
        prefix = "model.vision_tower.vision_tower.visual."
        openclip = openclip_tensors(config.convnext)
        tower = [(prefix + n[7:], s) for n, s in openclip if n.startswith("visual.")]
    # transformers saves model.* (embed, layers, norm, tower, projector), then lm_head and the rest
    return llama[:-1] + tower + projector + [llama[-1]] + extractor


def write_osprey_folder(
    folder: str | Path,
    preset: str = "osprey-7b",
    *,
    layers: int | None = None,
    shards: int = 2,
    fmt: str = "bin",
    tower_in_shards: bool = False,
    seed: int = 0,
) -> Path:
    """An Osprey folder: config.json, a small tokenizer with <mask> and <pos> added, and
    random bf16 weights in `shards` files with their index. `layers`: decoder depth."""
    config = RGPTConfig.from_preset(preset)
    if layers is not None:
        config.llm.num_layers = layers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(osprey_hf_config(config), indent=2))
    _write_tokenizer(folder, config)
    tensors = osprey_tensors(config, tower_in_shards)
    _write_checkpoint(folder, tensors, shards, fmt, torch.bfloat16, seed, prefix=fmt)
    return folder


def write_convnext_file(
    path: str | Path,
    preset: str = "osprey-7b",
    *,
    text: dict | None = None,
    trunk: ConvNeXtConfig | None = None,
    seed: int = 1,
) -> Path:
    """OpenCLIP's ConvNeXt checkpoint (fp32): .bin (torch.save) or .safetensors by suffix.
    `trunk` overrides the preset's trunk shapes (tests of mismatched files)."""
    config = RGPTConfig.from_preset(preset)
    if trunk is not None:
        config.convnext = trunk
    if text is None and preset != "osprey-7b":
        text = {"width": 32, "layers": 1, "vocab": 64, "context": 8, "embed_dim": 32}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
    tensors = openclip_tensors(config.convnext, text)
    _write_checkpoint(path.parent, tensors, 1, fmt, torch.float32, seed, single=path.name)
    return path


def _value(name: str, shape, generator, dtype) -> torch.Tensor:
    if name.endswith(("norm.weight", "layernorm.weight", "ln_1.weight", "ln_2.weight")) or (
        name.endswith((".stem.1.weight", "downsample.0.weight", "ln_final.weight"))
    ):
        return torch.ones(shape, dtype=dtype)  # norms as trained models start
    if name == "logit_scale":
        return torch.tensor(4.6052, dtype=dtype)
    return torch.randn(shape, generator=generator).mul_(STD).to(dtype)


def _write_checkpoint(
    folder: Path, tensors, shards: int, fmt: str, dtype, seed: int, prefix: str = "",
    single: str | None = None,
) -> None:  # fmt: skip
    """HF-style shards split by size at tensor boundaries, with an index (none for `single`)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(_numel(s) for _, s in tensors)
    groups: list[list] = [[] for _ in range(shards)]
    written = 0
    for name, shape in tensors:
        groups[min(shards - 1, written * shards // max(total, 1))].append((name, shape))
        written += _numel(shape)
    groups = [g for g in groups if g]
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        file = single or (
            f"{stem}-{index:05d}-of-{len(groups):05d}.{ext}" if len(groups) > 1 else f"{stem}.{ext}"
        )
        if fmt == "bin":
            state = {n: _value(n, s, generator, dtype) for n, s in group}
            torch.save(state, folder / file)
            del state
        else:
            entries = [TensorEntry(n, dtype, s) for n, s in group]
            with SafetensorsWriter(folder / file, entries, {"format": "pt"}) as writer:
                for n, s in group:
                    writer.write(n, _value(n, s, generator, dtype))
        weight_map.update({n: file for n, _ in group})
    if single is None and len(groups) > 1:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        index = {"metadata": {"total_size": itemsize * total}, "weight_map": weight_map}
        name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        (folder / name).write_text(json.dumps(index, indent=2))


def _write_tokenizer(folder: Path, config: RGPTConfig) -> None:
    """rgpt_rt's small byte-level tokenizer with <s>, </s>, <unk>, then <mask> and <pos> added
    as Osprey adds them (tokenizer.add_tokens(['<mask>', '<pos>'], special_tokens=True))."""
    from tokenizers import AddedToken

    from rgpt_rt.config import TokenConfig
    from rgpt_rt.tokenizer import train_tokenizer

    tokens = TokenConfig(region="<unk>", image="<unk>", pad="<unk>")
    texts = [
        "A chat between a curious human and an artificial intelligence assistant.",
        "Please give me a short description of Using a short phrase.",
        "Can you give me a detailed description of This provides an overview of the picture.",
    ]
    tokenizer = train_tokenizer(texts * 4, min(config.llm.vocab_size, 400), tokens)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<mask>", "<pos>")]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {t: tokenizer.token_to_id(t) for t in ("<mask>", "<pos>")}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
        )
    )


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
