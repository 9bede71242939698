"""The synthetic files have the public files' names and shapes; they load without running
Osprey's code, from .bin and safetensors, with the tower in the shards or in its own file;
bad inputs fail with errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from rgpt_rt.config import ConvNeXtConfig, RGPTConfig
from rgpt_rt.export.osprey_source import OspreySource
from rgpt_rt.export.synthetic_osprey import (
    openclip_tensors,
    osprey_tensors,
    write_convnext_file,
    write_osprey_folder,
)
from rgpt_rt.model.convnext import ConvNeXtTrunk
from rgpt_rt.model.osprey import Osprey

# OpenCLIP 3.3's create_model("convnext_large_d_320") state dict, counted once by hand (docs/osprey.md):
# 543 tensors, 351,772,609 values; its trunk's first and a late name as timm spells them.
OPENCLIP_TENSORS, OPENCLIP_VALUES = 543, 351_772_609


def test_openclip_file_layout_matches_openclip_at_full_size():
    names = openclip_tensors(ConvNeXtConfig())
    assert len(names) == OPENCLIP_TENSORS
    assert sum(torch.Size(s).numel() for _, s in names) == OPENCLIP_VALUES
    shapes = dict(names)
    assert shapes["visual.trunk.stem.0.weight"] == (192, 3, 4, 4)
    assert shapes["visual.trunk.stages.2.blocks.26.mlp.fc1.weight"] == (3072, 768)
    assert shapes["visual.trunk.stages.3.downsample.1.weight"] == (1536, 768, 2, 2)
    assert shapes["visual.head.mlp.fc2.weight"] == (768, 1536)


def test_trunk_module_names_are_the_files_trunk_names():
    with torch.device("meta"):
        trunk = ConvNeXtTrunk(ConvNeXtConfig()).state_dict()
    in_file = {
        n.removeprefix("visual.trunk."): s
        for n, s in openclip_tensors(ConvNeXtConfig())
        if n.startswith("visual.trunk.") and not n.startswith("visual.trunk.head.")
    }
    assert {n: tuple(t.shape) for n, t in trunk.items()} == in_file


def test_osprey_7b_checkpoint_names_and_shapes():
    shapes = dict(osprey_tensors(RGPTConfig.from_preset("osprey-7b")))
    assert shapes["model.embed_tokens.weight"] == (32000, 4096)
    assert shapes["model.mm_projector.0.weight"] == (4096, 768)  # res4's 768 channels
    assert shapes["model.mm_projector.2.weight"] == (4096, 4096)
    assert shapes["mask_extractor.res2.weight"] == (1024, 192)
    assert shapes["mask_extractor.res5.weight"] == (1024, 1536)
    assert shapes["mask_extractor.feat_linear.weight"] == (4096, 1024)
    assert shapes["mask_extractor.mask_linear.layers.0.weight"] == (1024, 112 * 112)
    assert shapes["mask_extractor.mask_linear.layers.2.weight"] == (4096, 1024)
    assert not any(n.startswith("model.vision_tower.") for n in shapes)


@pytest.mark.slow  # three-shard folders written and read: ~3-4.5 s each
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_folder_layouts_load_and_agree(tmp_path, fmt, osprey_files):
    folder = write_osprey_folder(
        tmp_path / "o", preset="osprey-narrow", fmt=fmt, shards=3, tower_in_shards=True
    )
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    assert len(set(json.loads((folder / index).read_text())["weight_map"].values())) == 3
    source = OspreySource.open(folder)  # the tower from the shards: no --convnext needed
    assert source.record["convnext"] == "in the shards"
    assert source.config.convnext.depths == (1, 1, 2, 1)
    assert source.tokenizer().token_to_id("<pos>") == source.tokenizer().token_to_id("<mask>") + 1
    model = Osprey.from_files(folder)
    assert model.config.num_image_tokens == 1024


def test_reading_a_bin_shard_keeps_no_mapping(osprey_files):
    source = OspreySource.open(*osprey_files)
    first = source.llm.read("model.embed_tokens.weight")
    assert first.dtype == torch.bfloat16 and source.llm.shards._mapped is not None
    source.llm.shards.release()
    assert source.llm.shards._mapped is None


@pytest.mark.slow  # damaged folders written and read: ~2.7 s
def test_errors_name_the_file(tmp_path, osprey_files):
    folder, convnext = osprey_files
    with pytest.raises(ValueError, match="shards hold no vision tower.*--convnext"):
        OspreySource.open(folder)
    broken = write_osprey_folder(tmp_path / "b", preset="osprey-narrow", shards=2)
    shard = broken / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin could not be read"):
        OspreySource.open(broken, convnext)
    (broken / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002.bin is missing"):
        OspreySource.open(broken, convnext)
    wrong = write_convnext_file(
        tmp_path / "wrong.bin",
        preset="osprey-narrow",
        trunk=ConvNeXtConfig((1, 1, 1, 1), (8, 16, 32, 64)),
    )
    with pytest.raises(
        ValueError, match=r"mm_projector.0.weight is \[128, 64\] but the config implies \[128, 32\]"
    ):
        OspreySource.open(folder, wrong)
