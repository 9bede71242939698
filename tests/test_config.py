import pytest

from rgpt_rt.config import RGPTConfig


def test_presets_have_the_documented_shapes():
    big = RGPTConfig.from_preset("rgpt-7b")
    assert (big.vision.grid, big.hires_grid, big.num_image_tokens) == (24, 96, 576)
    assert (big.vision.hidden_size, big.llm.hidden_size, big.llm.num_layers) == (1024, 4096, 32)
    assert big.vision.layers_used == 23  # penultimate layer: the last one never runs
    tiny = RGPTConfig.from_preset("tiny")
    assert tiny.num_image_tokens == tiny.vision.grid**2


def test_config_round_trips_through_a_dict():
    cfg = RGPTConfig.from_preset("tiny")
    assert RGPTConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*rgpt-7b.*tiny"):
        RGPTConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("vision", {"image_size": 65, "patch_size": 8}, "multiple of patch_size"),
        ("llm", {"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ("vision", {"select_layer": 0}, "select_layer"),
    ],
)
def test_bad_values_fail_where_written(section, values, message):
    data = RGPTConfig.from_preset("tiny").to_dict()
    data[section].update(values)
    with pytest.raises(ValueError, match=message):
        RGPTConfig.from_dict(data)


def test_unknown_keys_are_refused():
    data = RGPTConfig.from_preset("tiny").to_dict()
    data["llm"]["hidden"] = 3
    with pytest.raises(ValueError, match="unknown keys"):
        RGPTConfig.from_dict(data)
