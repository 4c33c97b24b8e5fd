"""`neo-jax plan`: per-device memory before launching (the parameter figure is checked against real
shards on a simulated mesh in tests/multidevice/sharded_checks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neo_jax.cli import main
from neo_jax.config import GPTNeoConfig
from neo_jax.plan import plan

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def test_one_device_parameters_are_the_whole_model():
    config = GPTNeoConfig.preset("125M")
    result = plan(config, ONE, batch=1, seq=128)
    assert result["parameters"] == config.num_params() * 4
    assert result["gradients"] == result["parameters"] and result["optimizer_state"] == 2 * result["parameters"]
    assert result["total"] == sum(v for k, v in result.items() if k != "total")


def test_sharding_and_remat_shrink_the_right_terms():
    config = GPTNeoConfig.preset("1.3B")
    dense = {"attention": "dense"}  # the [seq, seq] scores make remat's saving largest
    base = plan(config, {"data": 1, "fsdp": 8, "tensor": 1}, batch=8, seq=2048, **dense)
    # every [.., embed] array splits by 8; only the MLP biases ([layers, mlp], mlp -> tensor) stay whole
    mlp_biases = config.num_layers * config.inner_size * 4
    assert base["parameters"] == (config.num_params() * 4 - mlp_biases) / 8 + mlp_biases
    remat = plan(config, {"data": 1, "fsdp": 8, "tensor": 1}, batch=8, seq=2048, remat="full", **dense)
    assert remat["activations"] < base["activations"] / 3 and remat["parameters"] == base["parameters"]
    data = plan(config, {"data": 8, "fsdp": 1, "tensor": 1}, batch=8, seq=2048, **dense)
    assert data["parameters"] == config.num_params() * 4  # pure data parallelism replicates
    assert data["activations"] == base["activations"]  # same rows per device


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch": 6}, "multiple of data x fsdp = 4"),
        ({"seq": 4096}, "max_position_embeddings"),
        ({"batch": 0}, "positive"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(GPTNeoConfig.preset("125M"), {"data": 2, "fsdp": 2, "tensor": 1}, **{"batch": 8, "seq": 512, **kwargs})


def test_cli(capsys, tmp_path):
    assert main(["plan", "--model", "2.7B", "--mesh", "1,8,1", "--batch", "8", "--seq", "2048", "--remat", "full"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "TPU v4 (32 GiB): yes" in out
    assert main(["plan", "--model", "125M", "--mesh", "1,1,1", "--batch", "2", "--seq", "512", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["parameters"] == GPTNeoConfig.preset("125M").num_params() * 4
    GPTNeoConfig.preset("125M").to_json_file(tmp_path / "config.json")  # a directory works too
    assert main(["plan", "--model", str(tmp_path), "--mesh", "1,1,1", "--batch", "2", "--seq", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == record["parameters"]
    assert main(["plan", "--model", "125M", "--mesh", "8", "--batch", "8", "--seq", "512"]) == 2
    assert "a mesh is three sizes D,F,T" in capsys.readouterr().err


def test_cli_reads_a_finetuning_config(capsys):
    """--config takes the model (a released model's hub id needs no network), batch, accumulation, remat, mesh
    and slice from the YAML; flags override them."""
    config = str(Path(__file__).parents[1] / "configs" / "finetune-2.7B.yaml")
    assert main(["plan", "--config", config, "--no-compile", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["topology"] == "v4-8" and record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    expected = plan(GPTNeoConfig.preset("2.7B"), record["mesh"], 16, 2048, remat="full", grad_accum=2)
    assert record["total"] == expected["total"] and record["fits"]
    assert main(["plan", "--config", config, "--no-compile", "--json", "--batch", "32"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["activations"]
        == plan(GPTNeoConfig.preset("2.7B"), record["mesh"], 32, 2048, remat="full", grad_accum=2)["activations"]
    )


def test_int8_parameter_estimate_is_the_loaded_model_s(tmp_path, capsys):
    """The plan's int8 weight bytes are those of a model loaded with weights="int8" (its buffers), and the CLI
    takes --weights for generation only."""
    import jax
    from flax import nnx

    import neo_jax
    from neo_jax.plan import generation_estimate
    from tests.conftest import make_hf_model

    make_hf_model().save_pretrained(tmp_path / "model")
    model = neo_jax.from_pretrained(tmp_path / "model", weights="int8", progress=False)
    loaded = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    estimate = generation_estimate(model.config, ONE, 1, 64, 32, dtype="float32", int8=True)
    assert estimate["parameters"] == loaded
    argv = ["plan", "--model", "125M", "--mesh", "1,1,1", "--task", "generate", "--batch", "1", "--json"]
    assert main([*argv, "--weights", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)["parameters"]
    assert main([*argv, "--weights", "bfloat16"]) == 0
    assert int8 < 0.55 * json.loads(capsys.readouterr().out)["parameters"]
    assert main(["plan", "--model", "125M", "--mesh", "1,1,1", "--batch", "1", "--seq", "8", "--weights", "int8"]) == 2
    assert "--lora-rank" in capsys.readouterr().err
    # A LoRA run on an int8 base (--lora-base int8): the frozen base shrinks, the adapters' state does not.
    from neo_jax.lora import LoRAConfig

    adapters = LoRAConfig(r=8)
    qlora = plan(GPTNeoConfig.preset("125M"), ONE, 1, 128, lora=adapters, int8=True)
    lora = plan(GPTNeoConfig.preset("125M"), ONE, 1, 128, lora=adapters)
    assert qlora["parameters"] < 0.6 * lora["parameters"] and qlora["optimizer_state"] == lora["optimizer_state"]


def test_serving_adapters_cost_their_own_bytes_compiled_for_a_tpu(gpt2_model_dir, capsys):
    """``--task serve`` compiles the server's two steps for a v5e-1: adapters add their own bytes (A and B in
    float32, up to XLA:TPU's tile padding) to the arguments, not a model each; the cache is the slots'."""
    from neo_jax import lora
    from neo_jax.generation.cache import cache_bytes

    argv = ["plan", "--task", "serve", "--model", str(gpt2_model_dir), "--topology", "v5e-1", "--batch", "4"]
    argv += ["--max-len", "128", "--prefill-chunk", "32", "--dtype", "float32", "--json"]
    results = {}
    for count in (0, 8):
        assert main([*argv, "--adapters", str(count), "--lora-rank", "16", "--lora-targets", "q_proj,c_fc"]) == 0
        results[count] = json.loads(capsys.readouterr().out)
    config = GPTNeoConfig.from_json_file(gpt2_model_dir / "config.json")
    per_adapter = config.num_layers * 16 * (2 * config.hidden_size + config.inner_size + config.hidden_size) * 4
    assert results[8]["adapters"] == 8 * per_adapter and results[0]["adapters"] == 0
    assert results[0]["kv_cache"] == cache_bytes(config, 4, 128, "float32")
    grown = {p: results[8][p]["arguments"] - results[0][p]["arguments"] for p in ("step", "mixed")}
    # XLA:TPU pads this tiny model's 64-wide dimensions to its tiles: 655,360 bytes for 458,752 of adapters
    assert grown["step"] == grown["mixed"] and 8 * per_adapter <= grown["step"] <= 1.5 * 8 * per_adapter, grown
    assert lora.LoRAConfig(r=16).targets == ("q_proj", "v_proj")  # the default when --lora-targets is left out


def test_embedding_plan_compiled_for_a_tpu(capsys):
    """``--task embed`` compiles ``neo-jax embed``'s pooled forward for a v5e-8: XLA:TPU's temporaries grow with the
    tokens per chip, the arguments are the weights' shards (and the ids), and the FLOPs are the blocks' forward."""
    argv = ["plan", "--task", "embed", "--model", "125M", "--topology", "v5e-8", "--json"]
    results = {}
    for batch, seq in ((16, 128), (16, 512)):
        assert main([*argv, "--batch", str(batch), "--seq", str(seq)]) == 0
        results[seq] = json.loads(capsys.readouterr().out)
    small, big = results[128], results[512]
    assert small["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and small["fits"]
    assert small["parameters"] <= small["arguments"] <= small["parameters"] * 1.1
    assert big["temporaries"] > 3 * small["temporaries"] > 0
    config = GPTNeoConfig.preset("125M")
    blocks = config.num_layers * (4 * 768 * 768 + 2 * 768 * 3072)  # no LM head: nothing is predicted
    assert small["flops_per_chip"] == 16 * 128 * (2 * blocks + 4 * 12 * 128 * 768) / 8
    assert big["roofline"]["documents_per_s"] > 0
    assert main([*argv, "--batch", "12", "--seq", "128"]) == 2  # 12 rows do not split over 8 chips
    assert "must be a multiple of the mesh's data x fsdp (8)" in capsys.readouterr().err
    assert main([*argv, "--batch", "16"]) == 2
    assert "--batch and --seq are required for --task embed" in capsys.readouterr().err


def test_a_speculating_server_is_planned_with_its_draft_compiled_for_a_tpu(gpt2_model_dir, tmp_path, capsys):
    """``--task serve --draft``: the speculative round and the draft model's catch-up compiled with the steps
    for a v5e-1; both caches grow by k + 1 slots a row (n-gram's too), the draft's weights and cache are the
    round's extra arguments, and they count beside every step in the total. A draft of another vocabulary is
    refused."""
    from neo_jax.generation.cache import cache_bytes
    from tests.conftest import make_hf_model, save_gpt2_vocab_model

    draft = save_gpt2_vocab_model(tmp_path / "draft", hidden_size=32, num_heads=2)
    argv = ["plan", "--task", "serve", "--model", str(gpt2_model_dir), "--topology", "v5e-1", "--batch", "4"]
    argv += ["--max-len", "128", "--prefill-chunk", "32", "--dtype", "float32", "--json", "--draft-tokens", "1"]
    assert main([*argv, "--draft", str(draft)]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert main([*argv, "--draft", "ngram", "--no-compile"]) == 0  # the estimate: n-gram has no draft to hold
    ngram = json.loads(capsys.readouterr().out)
    config = GPTNeoConfig.from_json_file(gpt2_model_dir / "config.json")
    assert ngram["kv_cache"] == drafted["kv_cache"] == cache_bytes(config, 4, 128 + 2, "float32")
    assert "spec" in drafted and "catch" in drafted and "draft_parameters" not in ngram
    resident = drafted["spec"]["arguments"] - drafted["step"]["arguments"]
    own = drafted["draft_parameters"] + drafted["draft_kv_cache"]
    assert own <= resident <= 1.5 * own, (own, resident)  # XLA:TPU pads the tiny model's dimensions to its tiles
    assert drafted["total"] >= max(drafted["step"]["total"] + resident, drafted["spec"]["total"])
    make_hf_model().save_pretrained(tmp_path / "small-vocab")
    assert main([*argv, "--draft", str(tmp_path / "small-vocab")]) == 2
    assert "has a vocabulary of 320 tokens" in capsys.readouterr().err
