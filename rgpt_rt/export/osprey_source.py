"""An Osprey checkpoint as an export source: the Osprey-7b folder and OpenCLIP's ConvNeXt file.

    source = OspreySource.open("Osprey-7b/", "open_clip_pytorch_model.bin")   # checked, nothing big read
    source.config                       # the osprey-family RGPTConfig
    source.llm                          # the LLaMA tensors, read one at a time (export/llm.py's source)
    side = OspreyVisionSide.from_source(source)    # ConvNeXt + projector (+ the MaskExtractor's weights)

The vision side is what export/onnx_vision.py turns into vision.onnx: pixels -> the image
embeddings and the four feature levels res2..res5 (channels last, what mask pooling reads).
The MaskExtractor is not in the graph: its weights go to connector.safetensors, and the
runtime's region encoder (runtime/families/osprey.py) runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rgpt_rt.config import LLMConfig, RGPTConfig
from rgpt_rt.export.llama_source import expected_shapes
from rgpt_rt.export.vision_side import TransposedLinear
from rgpt_rt.model.convnext import ConvNeXtTrunk
from rgpt_rt.model.osprey_checkpoint import (
    MASK_EXTRACTOR_PREFIXES,
    PROJECTOR,
    TOWER_IN_SHARDS,
    CheckpointShards,
    open_convnext,
    read_osprey_config,
    trunk_reader,
)
from rgpt_rt.runtime.hf_llama import llm_config_from_hf
from rgpt_rt.tokenizer import ensure_special_tokens, load_tokenizer

OUTPUT_NAMES = ("image_embeds", "res2", "res3", "res4", "res5")


class OspreyLlm:
    """The LLaMA part of an Osprey checkpoint, as export/llm.py reads a source: `config`,
    `tensors` (name -> .entry), `read(name, dtype)`, `nbytes()`."""

    def __init__(self, shards: CheckpointShards, config: LLMConfig, folder: Path):
        self.shards, self.config, self.folder = shards, config, folder
        names = set(expected_shapes(config))
        self.tensors = {n: s for n, s in shards.tensors.items() if n in names}

    def llama_names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.shards.read(name, dtype)

    def nbytes(self) -> int:
        return sum(s.entry.nbytes for s in self.tensors.values())


class OspreySource:
    def __init__(self, folder: Path, config: RGPTConfig, shards, trunk, llm, record):
        self.folder, self.config = folder, config
        self.shards, self.trunk, self.llm, self.record = shards, trunk, llm, record

    @classmethod
    def open(cls, folder: str | Path, convnext: str | Path | None = None) -> OspreySource:
        """Check everything a long build would trip over: the folder's config and files, every
        shard readable, every tensor Osprey's model needs present with the shapes the config
        and the trunk imply. Errors name the file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--osprey {folder} does not exist")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; give the Osprey-7b folder")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") != "osprey" and "mm_vision_tower" not in raw:
            raise ValueError(
                f"{config_path} describes a {raw.get('model_type')!r} model, not Osprey "
                "(model_type 'osprey', with mm_vision_tower)"
            )
        llm_config = llm_config_from_hf({**raw, "model_type": "llama"})  # Osprey's LLM is LLaMA
        shards = CheckpointShards.open(folder)
        if convnext is not None:
            trunk = open_convnext(convnext)
        else:
            try:
                trunk = trunk_reader(shards, (TOWER_IN_SHARDS,), str(folder))
            except ValueError:
                raise ValueError(
                    f"{folder}'s shards hold no vision tower; give OpenCLIP's ConvNeXt file "
                    "with --convnext (open_clip_pytorch_model.bin of "
                    "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup)"
                ) from None
        config = read_osprey_config(folder, shards, trunk, llm_config)
        llm = OspreyLlm(shards, llm_config, folder)
        for name, shape in expected_shapes(llm_config).items():
            stored = shards.tensors.get(name)
            if stored is None:
                raise ValueError(
                    f"{folder}: no shard holds {name}, which config.json's model needs"
                )
            if tuple(stored.entry.shape) != shape:
                raise ValueError(
                    f"{stored.path}: {name} is {list(stored.entry.shape)} but config.json "
                    f"implies {list(shape)}; the config and the weights disagree"
                )
        _check_trunk(config, trunk)
        record = {"kind": "osprey", "osprey": str(folder.resolve())}
        record["convnext"] = str(Path(convnext).resolve()) if convnext else "in the shards"
        return cls(folder, config, shards, trunk, llm, record)

    def tokenizer(self):
        """The folder's tokenizer (tokenizer.json; else converted from tokenizer.model, which
        needs sentencepiece), with <image> added and <mask>, <pos> kept where it has them."""
        if (self.folder / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(self.folder)
        else:
            from rgpt_rt.model.rgpt import _llm_tokenizer

            tokenizer = _llm_tokenizer(self.folder)
        return ensure_special_tokens(tokenizer, self.config.tokens)

    def read_trunk(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: self.trunk.read(name, dtype) for name in self.trunk.tensors}

    def read_projector(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.shards.read_section(PROJECTOR, dtype)

    def read_mask_extractor(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.shards.read_section(MASK_EXTRACTOR_PREFIXES, dtype)


def _check_trunk(config: RGPTConfig, trunk: CheckpointShards) -> None:
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        expected = ConvNeXtTrunk(config.convnext).state_dict()
    for name, tensor in expected.items():
        stored = trunk.tensors.get(name)
        if stored is None:
            raise ValueError(f"{trunk.where}: the ConvNeXt trunk lacks {name}")
        if tuple(stored.entry.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{trunk.where}: {name} is {list(stored.entry.shape)}, not {list(tensor.shape)}"
            )


class OspreyVisionSide(nn.Module):
    """Osprey's encode_images without the LLM: pixels [B, 3, S, S] -> image_embeds [B, g², D]
    and res2..res5, each [B, H_l, W_l, C_l] (channels last). Holds the MaskExtractor's weights
    too (as tensors: not part of the graph) for connector.safetensors."""

    output_names = OUTPUT_NAMES

    def __init__(self, config: RGPTConfig, mask_extractor: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        channels = config.vision.hidden_size
        self.trunk = ConvNeXtTrunk(config.convnext)
        self.projector = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.mask_extractor = dict(mask_extractor or {})

    @classmethod
    def from_source(cls, source: OspreySource) -> OspreyVisionSide:
        side = cls(source.config, source.read_mask_extractor(torch.float32))
        side.trunk.load_state_dict(source.read_trunk(torch.float32))
        side.projector.load_state_dict(source.read_projector(torch.float32))
        source.shards.release()
        source.trunk.release()
        return side.float().eval()

    def forward(self, pixel_values: torch.Tensor):
        levels = self.trunk(pixel_values)  # [B, C_l, H_l, W_l] each
        image = levels[self.config.mask_extractor.image_level]
        image_embeds = self.projector(image.flatten(2).transpose(1, 2))  # [B, g², D]
        return (image_embeds, *(level.permute(0, 2, 3, 1) for level in levels))

    # --- what the bundle holds (export/onnx_vision.py reads these) -------------------------
    @torch.no_grad()
    def prepare_for_export(self) -> None:
        """fp16-exact values and linears as weight_t [in, out], as vision_side.VisionSide does."""
        for parameter in self.parameters():
            parameter.copy_(parameter.half().float())
        for root in (self.trunk, self.projector):
            for name, module in list(root.named_modules()):
                if type(module) is nn.Linear:
                    parent, _, child = name.rpartition(".")
                    holder = root.get_submodule(parent) if parent else root
                    setattr(holder, child, TransposedLinear(module))
        self.mask_extractor = {k: v.half().float() for k, v in self.mask_extractor.items()}

    def bundle_name(self, parameter_name: str) -> str | None:
        for prefix, part in (("trunk.", "convnext."), ("projector.", "projector.")):
            if parameter_name.startswith(prefix):
                return part + parameter_name[len(prefix) :]
        return None

    def bundle_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"vision": {convnext.*, projector.*}, "connector": {mask_extractor.*}}: fp16; every
        linear's weight as weight_t [in, out] (the runtime computes x @ weight_t + bias)."""
        out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "connector": {}}
        for name, tensor in self.named_parameters():
            bundle = self.bundle_name(name)
            if bundle is not None:
                out["vision"][bundle] = tensor.detach().half().contiguous()
        for name, tensor in self.mask_extractor.items():
            if name.endswith(".weight") and tensor.dim() == 2:
                name, tensor = name.removesuffix(".weight") + ".weight_t", tensor.t()
            out["connector"]["mask_extractor." + name] = tensor.detach().half().contiguous()
        return out
