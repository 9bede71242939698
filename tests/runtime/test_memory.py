"""The memory plan: read from a bundle before loading it, refusing up front what cannot fit."""

import pytest

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.cli import main as cli
from rgpt_rt.config import RGPTConfig
from rgpt_rt.runtime.memory import GiB, MemoryPlan, MiB, parse_bytes
from rgpt_rt.runtime.session import Session, default_bundle


@pytest.mark.parametrize(
    ("text", "value"),
    [("8GiB", 8 * GiB), ("7.5GB", 7_500_000_000), ("512MiB", 512 * MiB), ("100", 100), (42, 42)],
)
def test_sizes_parse(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["eight GiB", "-1GiB", "8 gigs", ""])
def test_bad_sizes_say_how_to_write_one(bad):
    with pytest.raises(ValueError, match="like '8GiB'"):
        parse_bytes(bad)


def test_the_plan_adds_up_the_bundles_parts():
    manifest = verify_bundle(default_bundle(), hashes=False)
    plan = MemoryPlan.of_bundle(manifest, "cpu", max_context=256, max_batch=2)
    llm = manifest.config.llm
    table = llm.vocab_size * llm.hidden_size * 2  # fp16, left in the file on a CPU
    assert plan.llm_weights == manifest.files["llm.safetensors"]["bytes"] - table
    cuda = MemoryPlan.of_bundle(manifest, "cuda", max_context=256, max_batch=2)
    assert cuda.llm_weights == manifest.files["llm.safetensors"]["bytes"]
    assert plan.kv_per_token == 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 2  # fp16
    assert plan.kv() == plan.kv_per_token * max(256, 2 * plan.batch_row)
    assert plan.total() == plan.fixed() + plan.kv()
    assert plan.longest_context(plan.total()) == 256
    assert plan.longest_context(plan.fixed() - 1) == 0
    assert "total, largest call in flight" in plan.table(budget=GiB)


def test_a_session_that_cannot_fit_its_budget_is_refused_before_loading():
    manifest = verify_bundle(default_bundle(), hashes=False)
    plan = MemoryPlan.of_bundle(manifest, "cpu")
    with pytest.raises(ValueError, match=r"needs about .* GiB .* but the budget is 0.10 GiB"):
        Session(device="cpu", memory_budget="0.1GiB")
    roomy = Session(device="cpu", memory_budget=plan.total() + MiB)
    assert roomy.describe("examples/shapes.png", (200, 20, 270, 90), max_new_tokens=4)


def test_info_prints_the_plan_of_a_bundle(capsys):
    assert (
        cli(["info", "--bundle", str(default_bundle()), "--memory", "8GiB", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    assert "memory plan (cpu)" in out and "KV cache per 1k positions" in out
    assert "budget 8.00 GiB: fits as configured" in out


@pytest.mark.parametrize("preset", ["rgpt-7b", "osprey-7b"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_default_prefix_cache_holds_one_image_prefix_at_full_size(preset, device):
    # Osprey-7b's 1,024 image tokens need more than the 512 MiB floor: without room for one
    # prefix, every question about an image would prefill its image tokens again
    config = RGPTConfig.from_preset(preset)
    plan = MemoryPlan.of_config(config, llm_file_bytes=0, vision_file_bytes=0, device=device)
    assert plan.prefix_cache >= 512 * MiB
    assert plan.prefix_cache >= plan.per_image_prefix  # the plan counts that one prefix
    # a CPU keeps the answer's whole cache: the prompt and a 256-token answer, bucketed
    prompt = config.num_image_tokens + 64 + 256
    assert plan.prefix_cache >= -(-prompt // 64) * 64 * plan.kv_per_token
    if preset == "osprey-7b":
        assert plan.prefix_cache > 512 * MiB
