"""The reference model: shapes, token splicing by value, the loss, freezing, save/load."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.ops import mask_pool_reference
from rgpt_rt.prompts import IGNORE_INDEX, Conversation, tokenize_conversation


def image_and_masks(height=50, width=70):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    first = np.zeros((height, width), dtype=bool)
    first[10:20, 5:30] = True
    second = np.zeros((height, width), dtype=np.uint8)
    second[30:45, 40:60] = 1
    return image, [first, second]


def test_shapes_through_every_stage(tiny_model):
    cfg = tiny_model.config
    g, size, channels, hidden = (
        cfg.vision.grid,
        cfg.vision.image_size,
        cfg.vision.hidden_size,
        cfg.llm.hidden_size,
    )
    pixels = torch.randn(2, 3, size, size)
    grid = tiny_model.vision(pixels)
    assert grid.shape == (2, g, g, channels)
    image_embeds, hires = tiny_model.encode_image(pixels)
    assert image_embeds.shape == (2, g * g, hidden)
    assert hires.shape == (2, 4 * g, 4 * g, channels)
    masks = torch.rand(5, 37, 41) > 0.5
    regions = tiny_model.encode_regions(hires, masks, torch.tensor([0, 1, 1, 0, 1]))
    assert regions.shape == (5, hidden)


def test_region_embeddings_land_at_their_tokens_by_value(tiny_model):
    image, masks = image_and_masks()
    prepared = tiny_model.prepare(image, masks, "Is <region2> above <region1>?")
    assert prepared.region_index.tolist() == [1, 0]
    image_embeds, hires = tiny_model.encode_image(prepared.pixel_values)
    regions = tiny_model.encode_regions(hires, prepared.masks)
    embeds = tiny_model.build_inputs_embeds(
        prepared.input_ids, image_embeds, regions[prepared.region_index]
    )

    ids = prepared.input_ids[0]
    region_positions = (ids == tiny_model.region_token_id).nonzero().flatten().tolist()
    expected_second = tiny_model.connector(mask_pool_reference(hires, prepared.masks[1:2]))[0]
    expected_first = tiny_model.connector(mask_pool_reference(hires, prepared.masks[0:1]))[0]
    # fp32 matmuls of 1 row and of 2 rows may round differently: 1e-6 is far below the gap
    # between the two regions' embeddings (checked by the last line)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds[0, region_positions[0]], expected_second, **close)
    torch.testing.assert_close(embeds[0, region_positions[1]], expected_first, **close)
    assert (expected_first - expected_second).abs().max() > 1e-3

    image_positions = (ids == tiny_model.image_token_id).nonzero().flatten()
    torch.testing.assert_close(embeds[0, image_positions], image_embeds[0], rtol=0, atol=0)
    text_position = 1  # the first system-prompt token keeps its word embedding
    torch.testing.assert_close(
        embeds[0, text_position],
        tiny_model.llm.get_input_embeddings().weight[ids[1]],
        rtol=0,
        atol=0,
    )


def test_the_loss_counts_answer_tokens_only(tiny_model):
    image, masks = image_and_masks()
    prepared = tiny_model.prepare(image, masks[:1], "Give a short description of <region1>.")
    tokens = tokenize_conversation(
        tiny_model.tokenizer,
        Conversation.single("Give a short description of <region1>.", "a large red circle"),
        num_regions=1,
        num_image_tokens=tiny_model.config.num_image_tokens,
        tokens=tiny_model.config.tokens,
    )
    input_ids = torch.tensor([tokens.input_ids])
    labels = torch.tensor([tokens.labels])
    out = tiny_model(prepared.pixel_values, input_ids, prepared.masks, labels=labels)

    answer = (labels[0] != IGNORE_INDEX).nonzero().flatten()
    answer_length = (
        len(tiny_model.tokenizer.encode(" a large red circle", add_special_tokens=False).ids) + 1
    )
    assert len(answer) == answer_length, "only the answer and its eos carry labels"
    manual = F.cross_entropy(
        out.logits[0, answer - 1], labels[0, answer]
    )  # logits at t predict t+1
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_refinement_and_connector_when_frozen():
    model = RGPT(RGPTConfig.from_preset("tiny"))
    model.set_trainable(vision=False, llm=False)
    image, masks = image_and_masks()
    prepared = model.prepare(image, masks, "<region1> <region2>")
    labels = prepared.input_ids.clone()
    out = model(
        prepared.pixel_values,
        prepared.input_ids,
        prepared.masks,
        region_index=prepared.region_index,
        labels=labels,
    )
    out.loss.backward()
    for name, param in model.named_parameters():
        trainable = name.startswith(("refinement.", "connector."))
        assert param.requires_grad == trainable, name
        if trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_forward_and_backward_with_everything_training():
    model = RGPT(RGPTConfig.from_preset("tiny"))
    image, masks = image_and_masks()
    prepared = model.prepare(image, masks, "<region1> <region2>")
    out = model(
        prepared.pixel_values,
        prepared.input_ids,
        prepared.masks,
        region_index=prepared.region_index,
        labels=prepared.input_ids,
    )
    out.loss.backward()
    assert model.vision.clip.get_input_embeddings().weight.grad is not None
    assert model.llm.get_input_embeddings().weight.grad is not None


def test_answer_returns_text(tiny_model):
    image, masks = image_and_masks()
    text = tiny_model.answer(
        image, masks, "Which is larger, <region1> or <region2>?", max_new_tokens=5
    )
    assert isinstance(text, str)
    ids = tiny_model.answer_ids(
        tiny_model.prepare(image, masks, "<region1> <region2>"), max_new_tokens=5
    )
    assert 0 <= len(ids) <= 5


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = RGPT.from_pretrained(tmp_path / "ckpt").eval()
    before, after = tiny_model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.config == tiny_model.config
    assert loaded.tokenizer.to_str() == tiny_model.tokenizer.to_str()
    image, masks = image_and_masks()
    prepared = tiny_model.prepare(image, masks, "<region1> <region2>")
    assert tiny_model.answer_ids(prepared, 6) == loaded.answer_ids(prepared, 6)


def test_a_checkpoint_missing_files_is_refused_by_name(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "rgpt.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing rgpt.safetensors"):
        RGPT.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RGPT.from_pretrained(tmp_path / "nowhere")


def test_save_over_an_existing_checkpoint_replaces_it(tiny_model, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    tiny_model.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "no temporary folder is left behind"
    )


@pytest.mark.parametrize(
    ("question", "mask_edit", "error", "message"),
    [
        ("What is <region1>?", "two", ValueError, "never names <region2>"),
        ("What is <region3>?", "two", ValueError, "names <region3>"),
        ("What is <region1>?", "empty", ValueError, "mask 1 is empty"),
        ("What is <region1>?", "small", ValueError, "mask 1 is 7x5 but the image is 70x50"),
        ("What is <region1>?", "float", ValueError, "mask 1 must be bool or uint8"),
        ("What is <region1>?", "rank", ValueError, "mask 1 must be 2-D"),
        ("What is <region1>?", "none", ValueError, "at least one mask"),
    ],
)
def test_bad_answer_inputs_say_what_is_wrong(tiny_model, question, mask_edit, error, message):
    image, masks = image_and_masks()
    chosen = {
        "two": masks,
        "empty": [np.zeros((50, 70), dtype=bool)],
        "small": [np.ones((5, 7), dtype=bool)],
        "float": [masks[0].astype(np.float32)],
        "rank": [np.ones((50, 70, 2), dtype=bool)],
        "none": [],
    }[mask_edit]
    with pytest.raises(error, match=message):
        tiny_model.answer(image, chosen, question)


def test_bad_images_say_what_is_wrong(tiny_model, tmp_path):
    _, masks = image_and_masks()
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="could not be read as an image"):
        tiny_model.answer(corrupt, masks[:1], "<region1>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_model.answer(tmp_path / "missing.png", masks[:1], "<region1>")
    with pytest.raises(ValueError, match="must be uint8"):
        tiny_model.answer(np.zeros((50, 70, 3), dtype=np.float32), masks[:1], "<region1>")
