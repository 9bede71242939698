"""Region numbers (connector.region_numbers): each region embedding plus its number K's vector.
The op itself, the reference model that trains them, and the Session on a bundle of a numbered
model, which must compute what the reference does."""

import pytest
import torch
from connector_variants import bundle_of, saved_variant, scene, variant_config, with_connector_field
from prefill_parity import as_the_bundle_stores, reference_logits, session_logits

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.ops import add_region_numbers
from rgpt_rt.prompts import refer_prompt
from rgpt_rt.runtime.session import Session

NUMBERS = 3


def test_each_mask_gets_its_place_among_its_own_samples_masks():
    table = torch.arange(NUMBERS, dtype=torch.float32)[:, None] * torch.ones(1, 4)  # row k = k
    embeds = torch.zeros(6, 4)
    batch_index = torch.tensor([1, 0, 1, 1, 0, 2])  # masks of three samples, interleaved
    numbered = add_region_numbers(embeds, table, batch_index)
    assert numbered[:, 0].tolist() == [0, 0, 1, 2, 1, 0]
    assert add_region_numbers(embeds[:3], table)[:, 0].tolist() == [0, 1, 2]
    assert add_region_numbers(embeds[:0], table).shape == (0, 4)


def test_more_regions_than_numbers_is_refused_with_the_limit():
    with pytest.raises(ValueError, match=r"at most 3 regions in one question .* 4 were given"):
        add_region_numbers(torch.zeros(4, 2), torch.zeros(NUMBERS, 2))


def numbered_config() -> RGPTConfig:
    return variant_config(region_numbers=NUMBERS)


@pytest.fixture(scope="module")
def numbered_checkpoint(tmp_path_factory):
    return saved_variant(numbered_config(), "region_number", 5, tmp_path_factory)


@pytest.fixture(scope="module")
def numbered_bundle(numbered_checkpoint, tmp_path_factory):
    return bundle_of(numbered_checkpoint, tmp_path_factory)


def test_the_reference_adds_each_regions_number_and_saves_the_table(numbered_checkpoint):
    model = RGPT.from_pretrained(numbered_checkpoint).eval()
    assert model.config.connector.region_numbers == NUMBERS
    image, masks = scene()
    prepared = model.prepare(image, masks, refer_prompt("the red star", 3))
    with torch.no_grad():
        _, hires = model.encode_image(prepared.pixel_values)
        plain = model.connector(model.pool_regions(hires, prepared.masks))
        numbered = model.encode_regions(hires, prepared.masks)
    torch.testing.assert_close(numbered - plain, model.connector.region_number.detach())


def test_the_session_computes_the_references_logits(numbered_checkpoint, numbered_bundle):
    """Three regions in one question: the Session numbers them 1, 2, 3 as the reference does."""
    reference = as_the_bundle_stores(RGPT.from_pretrained(numbered_checkpoint).eval())
    session = Session(numbered_bundle, device="cpu")
    image, masks = scene(1)
    question = refer_prompt("the red star", 3)
    expected, _ = reference_logits(reference, image, masks, question)
    logits, _ = session_logits(session, image, masks, question)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert session.ask(image, question, masks, max_new_tokens=8) == reference.answer(
        image, masks, question, max_new_tokens=8
    )


def test_each_region_of_describe_many_is_the_questions_first(numbered_bundle):
    session = Session(numbered_bundle, device="cpu")
    image, masks = scene(2)
    many = session.describe_many(image, masks, max_new_tokens=6)
    assert many == [session.describe(image, m, max_new_tokens=6) for m in masks]


def test_a_question_with_more_regions_than_numbers_says_so(numbered_bundle):
    session = Session(numbered_bundle, device="cpu")
    image, masks = scene(3)
    four = [*masks, (60, 60, 90, 90)]
    with pytest.raises(ValueError, match="numbers at most 3 regions"):
        session.refer(image, "the red star", four)


def test_a_bundle_whose_config_and_table_disagree_is_refused(numbered_bundle, tmp_path):
    copy = with_connector_field(numbered_bundle, tmp_path / "bundle", "region_numbers", 0)
    with pytest.raises(ValueError, match="connector weights hold region_number"):
        Session(copy, device="cpu")
