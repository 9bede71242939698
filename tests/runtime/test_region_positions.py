"""Region positions (connector.region_positions): each region embedding plus a projection of its
mask's centroid. The op itself, the reference model that trains the projection, and the Session
on a bundle of such a model, which must compute what the reference does."""

import math

import pytest
import torch
from connector_variants import bundle_of, saved_variant, scene, variant_config, with_connector_field
from prefill_parity import as_the_bundle_stores, reference_logits, session_logits

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.ops import add_region_positions
from rgpt_rt.ops.region_positions import mask_centroids, position_features
from rgpt_rt.prompts import refer_prompt
from rgpt_rt.runtime.session import Session

FREQUENCIES = 3


def test_centroids_are_image_relative_centres_of_mass():
    masks = torch.zeros(3, 8, 16, dtype=torch.bool)
    masks[0, 0:2, 0:4] = True  # top left block: x (0..4) / 16, y (0..2) / 8
    masks[1, 4:8, 8:16] = True  # bottom right quarter
    weights = torch.zeros(1, 8, 16)
    weights[0, :, 0] = 1.0
    weights[0, :, 15] = 3.0  # soft weights pull the centre towards the heavier column
    found = mask_centroids(torch.cat([masks.float(), weights]))
    expected = [[2 / 16, 1 / 8], [12 / 16, 6 / 8], [0.5, 0.5], [(0.5 + 3 * 15.5) / 4 / 16, 0.5]]
    torch.testing.assert_close(found, torch.tensor(expected))  # the empty mask: the centre


def test_features_are_sines_and_cosines_of_doubling_frequencies():
    features = position_features(torch.tensor([[0.25, 0.5]]), FREQUENCIES)
    assert features.shape == (1, 4 * FREQUENCIES)
    angles = [math.pi * 2**k * v for v in (0.25, 0.5) for k in range(FREQUENCIES)]
    expected = [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    order = [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]  # x's sines, x's cosines, then y's
    torch.testing.assert_close(features[0], torch.tensor(expected)[order])


def test_a_mask_count_unlike_the_embeddings_is_refused():
    with pytest.raises(ValueError, match="2 masks for 3 region embeddings"):
        add_region_positions(torch.zeros(3, 4), torch.ones(2, 8, 8), torch.zeros(4, 12))


def placed_config() -> RGPTConfig:
    return variant_config(region_positions=FREQUENCIES)


@pytest.fixture(scope="module")
def placed_checkpoint(tmp_path_factory):
    return saved_variant(placed_config(), "region_position.weight", 6, tmp_path_factory)


@pytest.fixture(scope="module")
def placed_bundle(placed_checkpoint, tmp_path_factory):
    return bundle_of(placed_checkpoint, tmp_path_factory)


def test_a_new_projection_starts_at_zero():
    assert not RGPT(placed_config()).connector.region_position.weight.any()


def test_the_reference_adds_each_masks_projection_and_saves_it(placed_checkpoint):
    model = RGPT.from_pretrained(placed_checkpoint).eval()
    assert model.config.connector.region_positions == FREQUENCIES
    image, masks = scene()
    prepared = model.prepare(image, masks, refer_prompt("the red star", 3))
    with torch.no_grad():
        _, hires = model.encode_image(prepared.pixel_values)
        plain = model.connector(model.pool_regions(hires, prepared.masks))
        placed = model.encode_regions(hires, prepared.masks)
    centres = torch.tensor([[22.5, 22.5], [70.0, 27.5], [45.0, 72.5]]) / 96  # the boxes' centres
    features = position_features(centres, FREQUENCIES)
    expected = features @ model.connector.region_position.weight.detach().T
    torch.testing.assert_close(placed - plain, expected, rtol=1e-4, atol=1e-3)


def test_the_session_computes_the_references_logits(placed_checkpoint, placed_bundle):
    reference = as_the_bundle_stores(RGPT.from_pretrained(placed_checkpoint).eval())
    session = Session(placed_bundle, device="cpu")
    image, masks = scene(1)
    question = refer_prompt("the red star", 3)
    expected, _ = reference_logits(reference, image, masks, question)
    logits, _ = session_logits(session, image, masks, question)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert session.ask(image, question, masks, max_new_tokens=8) == reference.answer(
        image, masks, question, max_new_tokens=8
    )


def test_a_bundle_whose_config_and_projection_disagree_is_refused(placed_bundle, tmp_path):
    copy = with_connector_field(placed_bundle, tmp_path / "bundle", "region_positions", 0)
    with pytest.raises(ValueError, match="connector weights hold region_position"):
        Session(copy, device="cpu")
