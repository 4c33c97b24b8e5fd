"""GPTNeoConfig: Hugging Face config.json in and out, validation, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from neo_jax.config import GPTNeoConfig, compress_attention_layers
from tests.conftest import SMALL, make_hf_model

CONFIGS = Path(__file__).parents[1] / "configs"
# Published hyperparameters of EleutherAI's checkpoints, and their parameter counts.
PUBLISHED = {
    "125M": (768, 12, 12, 125_198_592),
    "1.3B": (2048, 24, 16, 1_315_575_808),
    "2.7B": (2560, 32, 20, 2_651_307_520),
}


def test_round_trip_through_transformers_config(tmp_path):
    hf = transformers.GPTNeoConfig(
        **{**SMALL, "attention_types": [[["global"], 1], [["local", "global"], 1], [["local"], 1]]}
    )
    hf.save_pretrained(tmp_path)
    ours = GPTNeoConfig.from_json_file(tmp_path / "config.json")
    assert ours.attention_layers == ("global", "local", "global", "local")
    assert ours.hidden_size == 64 and ours.window_size == 16 and ours.eos_token_id == 0

    ours.to_json_file(tmp_path / "again.json")
    again = transformers.GPTNeoConfig.from_json_file(tmp_path / "again.json")
    for key in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "window_size",
        "max_position_embeddings",
        "activation_function",
        "layer_norm_epsilon",
        "intermediate_size",
        "eos_token_id",
        "bos_token_id",
    ):
        assert getattr(again, key) == getattr(hf, key), key
    assert again.attention_layers == hf.attention_layers
    assert GPTNeoConfig.from_json_file(tmp_path / "again.json") == ours


def test_expanded_attention_layers_alone_are_read():
    data = {**SMALL, "num_layers": 6, "attention_layers": ["global", "local"] * 3}
    del data["attention_types"]
    config = GPTNeoConfig.from_hf_dict(data)
    assert config.attention_types == ((("global", "local"), 3),)
    assert config.layer_period == ("global", "local") and config.num_periods == 3


def test_hf_aliases_and_eos_list():
    data = {k: v for k, v in SMALL.items() if k not in ("num_layers", "num_heads")}
    config = GPTNeoConfig.from_hf_dict(
        {**data, "num_hidden_layers": 4, "num_attention_heads": 8, "eos_token_id": [7, 8]}
    )
    assert (config.num_layers, config.num_heads, config.eos_token_id) == (4, 8, 7)


@pytest.mark.parametrize(
    "layers, period",
    [
        (["global", "local"] * 6, ("global", "local")),
        (["global"] * 4, ("global",)),
        (["global", "global", "local"] * 2, ("global", "global", "local")),
        (["global", "local", "local"], ("global", "local", "local")),  # no period: the whole list
        (["local", "global", "global", "local"], ("local", "global", "global", "local")),
    ],
)
def test_layer_period(layers, period):
    config = GPTNeoConfig.from_hf_dict(
        {**SMALL, "num_layers": len(layers), "attention_types": compress_attention_layers(layers)}
    )
    assert config.attention_layers == tuple(layers)
    assert config.layer_period == period
    assert config.num_periods * len(period) == len(layers)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_layers": 5}, "expands to 4 layers but num_layers is 5"),
        ({"hidden_size": 66}, "hidden_size \\(66\\) must be divisible by num_heads \\(4\\)"),
        ({"attention_types": [[["global", "sparse"], 2]]}, "unknown attention type\\(s\\) \\['sparse'\\]"),
        ({"activation_function": "gelu_fancy"}, "unknown activation_function 'gelu_fancy'"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"window_size": -1}, "window_size must be a positive integer"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"attention_layers": ["local"] * 4}, "attention_layers and attention_types disagree"),
        ({"tie_word_embeddings": False}, "tied to the token embedding"),
    ],
)
def test_invalid_configs_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        GPTNeoConfig.from_hf_dict({**SMALL, **change})


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        GPTNeoConfig.from_json_file(tmp_path / "config.json")


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_have_the_published_hyperparameters(name):
    hidden, layers, heads, n_params = PUBLISHED[name]
    data = json.loads((CONFIGS / f"gpt-neo-{name}.json").read_text())
    hf = transformers.GPTNeoConfig(**data)
    config = GPTNeoConfig.from_hf_dict(data)
    assert (config.hidden_size, config.num_layers, config.num_heads) == (hidden, layers, heads)
    assert (config.vocab_size, config.max_position_embeddings, config.window_size) == (50257, 2048, 256)
    assert config.eos_token_id == config.bos_token_id == 50256
    assert hf.attention_layers == list(config.attention_layers) == ["global", "local"] * (layers // 2)
    assert config.num_params() == n_params
    assert GPTNeoConfig.preset(name) == config  # the shipped file and the preset cannot drift apart


def test_num_params_matches_transformers():
    model = make_hf_model(intermediate_size=48, num_layers=3, attention_types=[[["global", "local", "local"], 1]])
    config = GPTNeoConfig.from_hf_dict(model.config.to_dict())
    assert config.num_params() == sum(p.numel() for p in model.parameters())
