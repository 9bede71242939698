"""Vision pretraining: the dense labels are the scene's ground truth, a few steps lower the
dense loss, a stage stopped at a step (vision_stop_after) resumes on the same curve, the heads
stay out of the model folders, and the position-embedding init touches only a new vision tower."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.model.vision import transformer_root
from rgpt_rt.ops import mask_pool_reference
from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.data.samples import collate
from rgpt_rt.training.data.shapes import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    dense_labels,
    make_scene,
    sample_object,
)
from rgpt_rt.training.model_init import READOUT_GAIN, build_model, read_out_connector
from rgpt_rt.training.runs import VISION_CHECKPOINT_PREFIX, complete_checkpoints
from rgpt_rt.training.train import DataSource, train
from rgpt_rt.training.vision_pretrain import DenseHeads

SMALL = dict(
    batch_size=8,
    vision_pretrain_lr=2e-3,
    warmup_steps=3,
    eval_per_task=0,
    vision_eval_scenes=8,
    progress=False,
    threads=1,
    steps=1,  # one language step after the stage: the run ends with a final/ model
)


def _object(shape, colour, size, position):
    base = sample_object(np.random.default_rng(0), 96)
    return dataclasses.replace(base, shape=shape, colour=colour, size=size, position=position)


def test_dense_labels_are_the_topmost_objects_values_and_background_elsewhere():
    # object 0 fills the top-left 48x48 pixels; object 1, drawn later, covers pixels 24..71
    # of both axes, so it takes the overlap; the rest is background
    labels = np.full((96, 96), -1, dtype=np.int16)
    labels[:48, :48] = 0
    labels[24:72, 24:72] = 1
    objects = [
        _object("star", "red", "large", "top left"),
        _object("ring", "blue", "small", "center"),
    ]
    scene = Scene(np.zeros((96, 96, 3), np.uint8), labels, objects, "plain", False)
    maps = dense_labels(scene, 24)  # 4x4-pixel cells; cell i's centre pixel is 4i + 2
    assert set(maps) == set(ATTRIBUTES)
    assert all(m.shape == (24, 24) and m.dtype == np.int64 for m in maps.values())
    expected = {
        (0, 0): ("star", "red", "large", "top left"),  # pixel (2, 2): object 0 alone
        (2, 9): ("star", "red", "large", "top left"),  # pixel (10, 38): above the overlap
        (6, 6): ("ring", "blue", "small", "center"),  # pixel (26, 26): the overlap, on top
        (11, 11): ("ring", "blue", "small", "center"),  # pixel (46, 46): object 0 too, below
        (17, 17): ("ring", "blue", "small", "center"),  # pixel (70, 70): object 1 alone
    }
    for (i, j), values in expected.items():
        got = tuple(ATTRIBUTES[name][maps[name][i, j]] for name in ATTRIBUTES)
        assert got == values, (i, j)
    background = (len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS))
    for i, j in ((0, 23), (23, 0), (18, 18), (23, 23), (12, 3)):  # (12, 3): pixel (50, 14)
        assert tuple(maps[name][i, j] for name in ATTRIBUTES) == background, (i, j)


def test_dense_labels_of_a_drawn_scene_cover_each_visible_object_with_its_values():
    scene = make_scene(np.random.default_rng([5, 1]), 96, num_objects=5)
    maps = dense_labels(scene, 24)
    owner = scene.labels[2::4, 2::4]  # the cell centres' pixels
    for index, obj in enumerate(scene.objects):
        cells = owner == index
        assert cells.any(), index  # every object keeps cells of its own at this grid
        for name, values in ATTRIBUTES.items():
            assert (maps[name][cells] == values.index(getattr(obj, name))).all(), (index, name)
    assert (maps["shape"][owner == -1] == len(SHAPES)).all()


def _model_tensors(folder):
    """Every tensor name in a save_pretrained folder's safetensors files."""
    return {
        f"{path.relative_to(folder)}:{key}"
        for path in folder.rglob("*.safetensors")
        for key in load_file(str(path))
    }


@pytest.mark.slow
def test_the_stage_lowers_the_dense_loss_resumes_on_its_curve_and_keeps_its_heads_out(tmp_path):
    cfg = dict(vision_pretrain_steps=24, checkpoint_every=12, eval_every=12, **SMALL)
    cfg |= dict(batch_size=4, vision_batch_size=8)  # 8 scenes per vision step, 4 per language
    straight = train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    losses = [straight.vision_losses[s] for s in range(1, 25)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert sorted(straight.vision_evals) == [12, 24]
    assert set(straight.vision_evals[24]) == {
        f"{name}_{where}" for name in ATTRIBUTES for where in ("cells", "regions")
    }
    found = complete_checkpoints(tmp_path / "a", VISION_CHECKPOINT_PREFIX)
    assert [p.name for p in found] == ["vision-step-00000012", "vision-step-00000024"]

    # the heads live only in the stage's trainer state, never in a model folder
    state = torch.load(found[-1] / "trainer.pt", weights_only=False)
    assert set(state["heads"]) == {f"heads.{n}.{p}" for n in ATTRIBUTES for p in ("weight", "bias")}
    fresh = tmp_path / "fresh"
    RGPT(RGPTConfig.from_preset("tiny")).save_pretrained(fresh)
    for folder in (tmp_path / "a" / "final", found[-1] / "model"):
        assert _model_tensors(folder) == _model_tensors(fresh), folder

    # a run stopped after vision step 12 (no language step, no final/) continues the stage,
    # then the language stage; its batches come from a worker process and are the same
    cfg["checkpoint_every"] = 8  # the stop writes its own checkpoint
    stopped = train(TrainConfig(out=str(tmp_path / "b"), vision_stop_after=12, **cfg))
    assert stopped.stopped and not stopped.losses and not (tmp_path / "b" / "final").exists()
    assert [p.name for p in complete_checkpoints(tmp_path / "b", VISION_CHECKPOINT_PREFIX)] == [
        "vision-step-00000008",
        "vision-step-00000012",
    ]
    assert not complete_checkpoints(tmp_path / "b")
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, data_workers=1, **cfg))
    for step in range(13, 25):
        # same scenes, weights, heads and optimizer state; a few float32 ulps of CPU matmul
        assert resumed.vision_losses[step] == pytest.approx(straight.vision_losses[step], rel=1e-5)
    assert resumed.losses[1] == pytest.approx(straight.losses[1], rel=1e-4)


def _position_table(model):
    return transformer_root(model.vision.clip).embeddings.position_embedding.weight


def test_the_position_init_redraws_a_new_towers_table_and_is_refused_for_a_loaded_one():
    torch.manual_seed(0)
    plain = _position_table(build_model(TrainConfig(out="x")))
    torch.manual_seed(0)
    redrawn = _position_table(build_model(TrainConfig(out="x", vision_pos_init_std=1.0)))
    assert plain.std().item() == pytest.approx(0.02, rel=0.2)  # CLIP's own init
    assert redrawn.std().item() == pytest.approx(1.0, rel=0.2)
    for loaded in (dict(clip="clip/", llm="llm/"), dict(init="ckpt/")):
        with pytest.raises(ValueError, match="keeps its position embedding"):
            TrainConfig(out="x", vision_pos_init_std=1.0, **loaded)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vision_pretrain_steps=-1), "vision_pretrain_steps must be >= 0"),
        (dict(vision_pretrain_steps=5, clip="c", llm="l"), "drop --vision-pretrain-steps"),
        (dict(vision_pretrain_steps=5, coco="a.json", coco_images="i/"), "shapes world"),
        (dict(vision_pos_init_std=0.0), "give a std > 0"),
        (dict(vision_batch_size=0), "vision_batch_size must be > 0"),
        (dict(data_workers=-1), "data_workers must be >= 0"),
    ],
)
def test_bad_vision_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", **kwargs)


def test_the_connector_starts_from_the_vision_readout():
    torch.manual_seed(0)
    model = build_model(TrainConfig(out="x"))
    heads = DenseHeads(model.config.vision.hidden_size)
    cfg = TrainConfig(out="x", batch_size=4)
    batch = collate(DataSource(cfg, model).micro_batch(0, 0), model.config, model.tokenizer, 0)
    read_out_connector(model, heads, batch)
    fc1, fc2 = model.connector.fc1, model.connector.fc2
    weight = torch.cat([head.weight for head in heads.heads.values()])
    count = weight.shape[0]
    assert count == sum(len(values) + 1 for values in ATTRIBUTES.values())
    ratio = fc1.weight[:count] / weight  # one positive scale for every head
    assert torch.allclose(ratio, ratio.flatten()[0]) and ratio.flatten()[0] > 0
    gain = fc2.weight[0, 0]
    assert torch.equal(fc2.weight[:count, :count], torch.eye(count) * gain)
    assert not fc2.weight[:count, count:].any() and not fc2.weight[count:, :count].any()

    with torch.no_grad():
        _, hires = model.encode_image(batch.pixel_values)
        pooled = mask_pool_reference(hires, batch.masks, batch.batch_index)
        regions = model.connector(pooled)
    units = torch.nn.functional.gelu(pooled @ fc1.weight[:count].T + fc1.bias[:count])
    assert torch.allclose(regions[:, :count], gain * units + fc2.bias[:count], atol=1e-5)
    logits = pooled @ (weight * ratio.flatten()[0]).T
    assert logits.std().item() == pytest.approx(1.0, rel=1e-3)
    spread = regions[:, :count].std(dim=0).mean() / regions[:, count:].std(dim=0).mean()
    assert spread.item() == pytest.approx(READOUT_GAIN, rel=1e-3)
