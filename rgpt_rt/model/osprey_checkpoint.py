"""Osprey's files on disk, read without running any of their code.

    shards = CheckpointShards.open("Osprey-7b/")        # pytorch_model-*.bin (+ index), or safetensors
    shards.shape("model.mm_projector.0.weight"); shards.read("lm_head.weight")
    trunk = open_convnext("open_clip_pytorch_model.bin") # OpenCLIP's file: the visual.trunk.* tensors
    config = read_osprey_config("Osprey-7b/", trunk)     # an osprey-family RGPTConfig

`.bin` files are read with `torch.load(mmap=True, weights_only=True)`: only tensors and plain
containers are unpickled (no class of theirs is imported or run), and a tensor's bytes are
paged in when it is read. At most `MAPPED_BYTES` of one shard are read through a mapping
before it is dropped and reopened, so a 10 GB shard never stays resident: reading a 7B
checkpoint tensor by tensor holds one tensor (plus that budget) at a time.

The names, as Osprey's code defines them (docs/osprey.md):
  LLaMA:        model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight
  projector:    model.mm_projector.{0,2}.{weight,bias}          (mlp2x_gelu; Linear-GELU-Linear)
  regions:      mask_extractor.{res2,res3,res4,res5,feat_linear}.{weight,bias},
                mask_extractor.mask_linear.layers.{0,1,2}.{weight,bias}
                (an attribute of OspreyLlamaForCausalLM, so not under model.; model.mask_extractor.*
                is read too)
  vision trunk: the OpenCLIP file's visual.trunk.* (timm ConvNeXt names); a checkpoint that also
                saved its tower holds them as model.vision_tower.vision_tower.visual.trunk.*
"""

from __future__ import annotations

import gc
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rgpt_rt.config import ConvNeXtConfig, LLMConfig, MaskExtractorConfig, RGPTConfig, osprey_config
from rgpt_rt.safetensors_io import TensorEntry, read_header, read_tensor

MAPPED_BYTES = 512 << 20
PROJECTOR = "model.mm_projector."
MASK_EXTRACTOR_PREFIXES = ("mask_extractor.", "model.mask_extractor.")
TOWER_IN_SHARDS = "model.vision_tower.vision_tower.visual.trunk."
OPENCLIP_TRUNK = "visual.trunk."
INDEXES = {
    "pytorch_model.bin.index.json": "bin",
    "model.safetensors.index.json": "safetensors",
}
SINGLES = {"pytorch_model.bin": "bin", "model.safetensors": "safetensors"}


@dataclass
class Stored:
    """Where one tensor is: its file, and what it is (no bytes read)."""

    path: Path
    entry: TensorEntry
    data_start: int = -1  # safetensors: the data section's start; -1: a .bin file


class CheckpointShards:
    """Tensors of one or more checkpoint files by name, read one at a time."""

    def __init__(self, where: str, tensors: dict[str, Stored]):
        self.where = where
        self.tensors = tensors
        self._mapped: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._mapped_read = 0

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> CheckpointShards:
        """A transformers folder: an index (.bin or safetensors) and its shards, or one file."""
        folder = Path(folder)
        for index, kind in INDEXES.items():
            if (folder / index).is_file():
                try:
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{folder / index} is not a weight index ({error})") from None
                files = sorted(set(weight_map.values()))
                tensors = _files(folder, files, kind, index)
                for name, shard in weight_map.items():
                    if name not in tensors or tensors[name].path.name != shard:
                        raise ValueError(f"{index} puts {name} in {shard}, which does not hold it")
                return cls(str(folder), tensors)
        for single, kind in SINGLES.items():
            if (folder / single).is_file():
                return cls(str(folder), _files(folder, [single], kind, None))
        raise FileNotFoundError(
            f"{folder} holds no weights: none of {[*INDEXES, *SINGLES]}; give the Osprey-7b "
            "folder as downloaded (config.json, tokenizer files, pytorch_model-*.bin)"
        )

    @classmethod
    def open_file(cls, path: str | Path) -> CheckpointShards:
        """One .bin / .pt / .pth (torch.save) or .safetensors file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        kind = "safetensors" if path.suffix == ".safetensors" else "bin"
        return cls(str(path), _files(path.parent, [path.name], kind, None))

    # --- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].entry.shape)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` in fresh memory (cast to `dtype` when given)."""
        stored = self.tensors[name]
        if stored.data_start >= 0:
            tensor = read_tensor(stored.path, stored.entry, stored.data_start)
        else:
            tensor = self._mapped_tensor(stored.path, name).clone()
            self._mapped_read += stored.entry.nbytes
            if self._mapped_read >= MAPPED_BYTES:
                self.release()
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def nbytes(self) -> int:
        return sum(s.entry.nbytes for s in self.tensors.values())

    def release(self) -> None:
        """Drop the mapping of the .bin shard being read (its pages leave this process)."""
        self._mapped, self._mapped_read = None, 0
        gc.collect()

    def _mapped_tensor(self, path: Path, name: str) -> torch.Tensor:
        if self._mapped is None or self._mapped[0] != path:
            self.release()
            self._mapped = (path, _torch_load(path))
        return self._mapped[1][name]

    def section(self, prefixes: tuple[str, ...] | str) -> dict[str, Stored]:
        """{name without the prefix: where} of the tensors under the first prefix that has any."""
        for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
            found = {n[len(prefix) :]: s for n, s in self.tensors.items() if n.startswith(prefix)}
            if found:
                return found
        return {}

    def read_section(self, prefixes, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under a prefix (see `section`), read, by its name without the prefix."""
        out = {}
        for short, stored in self.section(prefixes).items():
            out[short] = self.read(stored.entry.name, dtype)
        return out


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save file's state dict, memory-mapped; tensors and containers only."""
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint ({str(error).splitlines()[0]}); "
            "a truncated or partial download? fetch the file again"
        ) from None
    if (
        isinstance(loaded, dict)
        and "state_dict" in loaded
        and isinstance(loaded["state_dict"], dict)
    ):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _files(folder: Path, files: list[str], kind: str, index: str | None) -> dict[str, Stored]:
    tensors: dict[str, Stored] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            named = f" (named by {index})" if index else ""
            raise FileNotFoundError(f"{path} is missing{named}")
        if kind == "safetensors":
            try:
                entries, _, start = read_header(path)
            except (ValueError, OSError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
            size = path.stat().st_size
            for name, entry in entries.items():
                if start + entry.end > size:
                    raise ValueError(
                        f"{path} is truncated: {name} ends at byte {start + entry.end} but the "
                        f"file has {size}; download or copy it again"
                    )
                tensors[name] = Stored(path, entry, start)
        else:
            for name, tensor in _torch_load(path).items():  # shapes only: no data is touched
                tensors[name] = Stored(path, TensorEntry(name, tensor.dtype, tuple(tensor.shape)))
            gc.collect()
    return tensors


# --- the vision trunk --------------------------------------------------------------------------
def open_convnext(path: str | Path) -> CheckpointShards:
    """The OpenCLIP ConvNeXt checkpoint (open_clip_pytorch_model.bin or .safetensors), as a
    reader keyed by timm's trunk names (stem.0.weight, stages.2.blocks.5.mlp.fc1.weight, ...).
    A bare timm state dict (no visual.trunk. prefix) is taken too."""
    shards = CheckpointShards.open_file(path)
    return trunk_reader(shards, (OPENCLIP_TRUNK, ""), str(path))


def trunk_reader(shards: CheckpointShards, prefixes, where: str) -> CheckpointShards:
    """A reader of the trunk tensors under the first of `prefixes` that holds stem.0.weight."""
    for prefix in prefixes:
        if prefix + "stem.0.weight" in shards.tensors:
            trunk = {
                n[len(prefix) :]: s
                for n, s in shards.tensors.items()
                if n.startswith(prefix) and n[len(prefix) :].startswith(("stem.", "stages."))
            }
            return _Renamed(shards, trunk, where)
    raise ValueError(
        f"{where} holds no ConvNeXt trunk (no {prefixes[0]}stem.0.weight); give OpenCLIP's "
        "CLIP-convnext_large_d_320 file (open_clip_pytorch_model.bin)"
    )


class _Renamed(CheckpointShards):
    """A view of another reader's tensors under shorter names."""

    def __init__(self, base: CheckpointShards, tensors: dict[str, Stored], where: str):
        super().__init__(where, tensors)
        self.base = base

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.base.read(self.tensors[name].entry.name, dtype)

    def release(self) -> None:
        if hasattr(self, "base"):
            self.base.release()


def convnext_config_of(trunk: CheckpointShards, eps: float = 1e-6) -> ConvNeXtConfig:
    """The trunk's depths and widths, read from its tensors' names and shapes."""
    dims, depths = [], []
    for stage in range(4):
        blocks = {
            int(n.split(".")[3])
            for n in trunk.tensors
            if n.startswith(f"stages.{stage}.blocks.") and n.endswith(".conv_dw.weight")
        }
        if not blocks:
            raise ValueError(f"{trunk.where}: the trunk has no stage {stage} blocks")
        depths.append(max(blocks) + 1)
        dims.append(trunk.shape(f"stages.{stage}.blocks.0.conv_dw.weight")[0])
    return ConvNeXtConfig(depths=tuple(depths), dims=tuple(dims), layer_norm_eps=eps)


# --- the config --------------------------------------------------------------------------------
def read_osprey_config(
    folder: str | Path, shards: CheckpointShards, trunk: CheckpointShards, llm: LLMConfig
) -> RGPTConfig:
    """The osprey-family RGPTConfig of an Osprey folder (its config.json and its weights'
    shapes) and its vision trunk; errors name the file that disagrees."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"{folder}/config.json: mm_projector_type {projector!r}; rgpt_rt runs Osprey's "
            "'mlp2x_gelu' projector"
        )
    if raw.get("mm_use_im_start_end"):
        raise ValueError(
            f"{folder}/config.json sets mm_use_im_start_end, which Osprey-7b does not; not supported"
        )
    convnext = convnext_config_of(trunk)
    extractor = mask_extractor_config(shards.section(MASK_EXTRACTOR_PREFIXES), shards.where)
    config = osprey_config(llm, convnext, extractor, name=raw.get("_name_or_path") or folder.name)
    check_osprey_shapes(config, shards)
    return config


def osprey_shapes(config: RGPTConfig) -> dict[str, tuple[int, ...]]:
    """The projector's and the MaskExtractor's tensors (short names) and their shapes."""
    me, dims, hidden = config.mask_extractor, config.convnext.dims, config.llm.hidden_size
    image_channels = dims[me.image_level]
    shapes = {
        "mm_projector.0.weight": (hidden, image_channels),
        "mm_projector.0.bias": (hidden,),
        "mm_projector.2.weight": (hidden, hidden),
        "mm_projector.2.bias": (hidden,),
        "mask_extractor.feat_linear.weight": (hidden, me.embed_dim),
        "mask_extractor.feat_linear.bias": (hidden,),
    }
    for level, channels in enumerate(dims):
        shapes[f"mask_extractor.res{level + 2}.weight"] = (me.embed_dim, channels)
        shapes[f"mask_extractor.res{level + 2}.bias"] = (me.embed_dim,)
    widths = [me.mask_size**2, me.embed_dim, me.embed_dim, hidden]
    for i in range(3):
        shapes[f"mask_extractor.mask_linear.layers.{i}.weight"] = (widths[i + 1], widths[i])
        shapes[f"mask_extractor.mask_linear.layers.{i}.bias"] = (widths[i + 1],)
    return shapes


def stored_name(shards: CheckpointShards, short: str) -> str:
    """A short name of osprey_shapes -> its name in the checkpoint."""
    if short.startswith("mm_projector."):
        return PROJECTOR + short.removeprefix("mm_projector.")
    rest = short.removeprefix("mask_extractor.")
    for prefix in MASK_EXTRACTOR_PREFIXES:
        if prefix + rest in shards.tensors:
            return prefix + rest
    return MASK_EXTRACTOR_PREFIXES[0] + rest


def check_osprey_shapes(config: RGPTConfig, shards: CheckpointShards) -> None:
    for short, shape in osprey_shapes(config).items():
        name = stored_name(shards, short)
        stored = shards.tensors.get(name)
        if stored is None:
            raise ValueError(f"{shards.where}: no shard holds {name}, which Osprey's model needs")
        if tuple(stored.entry.shape) != shape:
            raise ValueError(
                f"{stored.path}: {name} is {list(stored.entry.shape)} but the config implies "
                f"{list(shape)}; the checkpoint and the vision trunk disagree"
            )


def mask_extractor_config(extractor: dict[str, Stored], where: str) -> MaskExtractorConfig:
    """mask_size and embed_dim from the MaskExtractor's tensors."""
    try:
        first = extractor["mask_linear.layers.0.weight"].entry.shape  # [embed, mask_size^2]
    except KeyError:
        raise ValueError(f"{where}: no mask_extractor.mask_linear.layers.0.weight") from None
    side = round(first[1] ** 0.5)
    if side * side != first[1]:
        raise ValueError(f"{where}: mask_linear takes {first[1]} inputs, not a square mask")
    return MaskExtractorConfig(mask_size=side, embed_dim=first[0])
