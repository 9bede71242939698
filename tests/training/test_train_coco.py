"""The trainer fine-tunes a model built with RGPT.from_components on COCO-format region data.
The CLIP and LLaMA folders are tiny random models, and the COCO file a few shapes, that the
test writes."""

import json

import numpy as np
import torch
from PIL import Image
from tiny_llama_folder import write_tiny_llama
from transformers import CLIPVisionConfig, CLIPVisionModel

from rgpt_rt.model import RGPT
from rgpt_rt.rle import encode_rle
from rgpt_rt.training.data.coco import SkippedAnnotations
from rgpt_rt.training.train import TrainConfig, train


def write_components(root):
    torch.manual_seed(1)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModel(vision).save_pretrained(root / "clip")
    write_tiny_llama(root / "llm")


def write_coco(root, name):
    """Three images of 48 x 64 with a square (polygon), a disc (RLE) and a box each, and one
    annotation with an empty segmentation."""
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(name))
    images, annotations = [], []
    ys, xs = np.mgrid[:48, :64]
    for image_id in range(1, 4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}{image_id}.png"
        )
        images.append(
            {"id": image_id, "file_name": f"{name}{image_id}.png", "height": 48, "width": 64}
        )
        disc = (ys - 30) ** 2 + (xs - 40) ** 2 <= 64
        annotations += [
            {
                "image_id": image_id,
                "category_id": 1,
                "segmentation": [[2, 2, 18, 2, 18, 18, 2, 18]],
                "bbox": [2, 2, 16, 16],
            },
            {
                "image_id": image_id,
                "category_id": 2,
                "segmentation": encode_rle(disc),
                "bbox": [32, 22, 17, 17],
            },
            {"image_id": image_id, "category_id": 3, "bbox": [5, 30, 20, 12]},
        ]
    annotations.append({"image_id": 1, "category_id": 1, "segmentation": [], "bbox": [1, 1, 3, 3]})
    data = {
        "images": images,
        "annotations": [{"id": i, **a} for i, a in enumerate(annotations)],
        "categories": [
            {"id": 1, "name": "square"},
            {"id": 2, "name": "disc"},
            {"id": 3, "name": "box"},
        ],
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_fine_tuning_a_from_components_model_on_coco(tmp_path, recwarn):
    write_components(tmp_path)
    train_file = write_coco(tmp_path, "train")
    eval_file = write_coco(tmp_path, "val")
    before = RGPT.from_components(tmp_path / "clip", tmp_path / "llm")
    common = dict(
        coco=str(train_file),
        coco_images=str(tmp_path / "images"),
        coco_eval=str(eval_file),
        batch_size=3,
        lr=3e-3,
        warmup_steps=1,
        eval_per_task=2,
        progress=False,
        threads=1,
    )
    stage1 = train(
        TrainConfig(
            out=str(tmp_path / "stage1"),
            clip=str(tmp_path / "clip"),
            llm=str(tmp_path / "llm"),
            stage=1,
            steps=4,
            eval_every=4,
            checkpoint_every=2,
            **common,
        )
    )
    assert any(issubclass(w.category, SkippedAnnotations) for w in recwarn.list)
    assert all(np.isfinite(list(stage1.losses.values())))
    assert set(stage1.evals[4]) == {"classify", "brief", "refer"}

    after = RGPT.from_pretrained(tmp_path / "stage1" / "final")
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if not k.startswith(("refinement.", "connector."))]
    assert any(k.startswith("vision.") for k in frozen) and any(
        k.startswith("llm.") for k in frozen
    )
    for key in frozen:  # stage 1: the vision tower and the LLM stay as they were loaded
        assert torch.equal(old[key], new[key]), key
    # the refinement's norm starts at exactly 1 in every new model; training moved it
    norm = new["refinement.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))
    assert after.config.name == "from-components"

    # stage 2 from the stage-1 model: the LLM trains too, and the loss falls
    stage2 = train(
        TrainConfig(
            out=str(tmp_path / "stage2"),
            init=str(tmp_path / "stage1" / "final"),
            stage=2,
            steps=8,
            eval_every=100,
            checkpoint_every=100,
            **common,
        )
    )
    first, last = stage2.losses[1], stage2.losses[8]
    assert last < first - 0.5, stage2.losses
    tuned = RGPT.from_pretrained(tmp_path / "stage2" / "final").state_dict()
    assert not torch.equal(tuned["llm.lm_head.weight"], new["llm.lm_head.weight"])
    key = vision_key(new)  # a model that starts from weights keeps its vision tower frozen
    assert torch.equal(tuned[key], new[key])
    text = after.answer(np.zeros((48, 64, 3), np.uint8), [(2, 2, 18, 18)], "What is <region1>?", 4)
    assert isinstance(text, str)


def vision_key(state):
    return next(k for k in state if k.startswith("vision.") and "patch_embedding" in k)
