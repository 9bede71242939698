"""RGPT.from_components builds the full model from local CLIP and LLaMA folders (no download).
The folders are tiny random models that the test writes with transformers."""

import json

import numpy as np
import pytest
import torch
from tiny_llama_folder import write_tiny_llama
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from rgpt_rt.model import RGPT

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "clip-vision")
    (root / "clip-vision" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    full = CLIPConfig(
        vision_config=VISION,
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
        ),
        projection_dim=8,
    )
    CLIPModel(full).save_pretrained(root / "clip-full")
    write_tiny_llama(root / "llm")
    return root


@pytest.mark.parametrize("clip_name", ["clip-vision", "clip-full"])
def test_from_components_loads_both_folders(folders, clip_name):
    model = RGPT.from_components(folders / clip_name, folders / "llm").eval()
    cfg = model.config
    assert (cfg.vision.hidden_size, cfg.vision.grid, cfg.vision.num_layers) == (32, 4, 3)
    assert cfg.vision.layers_used == 2, "the penultimate layer is the last one kept"
    assert (cfg.llm.hidden_size, cfg.llm.num_kv_heads) == (48, 2)
    assert model.connector.fc1.in_features == 32 and model.connector.fc2.out_features == 48

    reference = CLIPVisionModel.from_pretrained(
        str(folders / clip_name), local_files_only=True
    ).eval()
    pixels = torch.randn(1, 3, 32, 32)
    expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(
        model.vision(pixels).reshape(1, 16, 32), expected, rtol=1e-5, atol=1e-5
    )

    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mask = np.zeros((40, 30), dtype=bool)
    mask[5:15, 5:25] = True
    assert isinstance(model.answer(image, [mask], "What is <region1>?", max_new_tokens=3), str)


def test_preprocessor_statistics_are_read(folders):
    model = RGPT.from_components(folders / "clip-vision", folders / "llm")
    assert model.config.vision.image_mean == (0.5, 0.5, 0.5)


def test_wrong_folders_are_refused_before_loading(folders, tmp_path):
    with pytest.raises(ValueError, match="not CLIP"):
        RGPT.from_components(folders / "llm", folders / "llm")
    with pytest.raises(ValueError, match="must be LLaMA-architecture"):
        RGPT.from_components(folders / "clip-vision", folders / "clip-full")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RGPT.from_components(tmp_path / "nothing", folders / "llm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RGPT.from_components(tmp_path / "empty", folders / "llm")
