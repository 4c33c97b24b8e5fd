"""Import from and export to Hugging Face checkpoints, the Orbax format, and the errors on bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import neo_jax
from neo_jax import convert
from neo_jax.hf import write_safetensors
from tests.conftest import SMALL, TOKENIZER_DIR, hf_logits, make_hf_model, random_ids

TOL = 1e-4


@pytest.fixture
def hf(save_hf):
    model = make_hf_model()
    return model, save_hf(model)


def logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)))


def params(model):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }


# ----------------------------------------------------------------------------------------------- sources
def test_sharded_safetensors(save_hf):
    model = make_hf_model()
    directory = save_hf(model, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    ids = random_ids(2, 50, SMALL["vocab_size"])
    assert np.abs(logits(neo_jax.from_pretrained(directory, progress=False), ids) - hf_logits(model, ids)).max() <= TOL


def test_legacy_pytorch_bin_with_mask_buffers(tmp_path):
    """Old checkpoints are pytorch_model.bin with the attention mask buffers and the tied head inside."""
    model = make_hf_model()
    state = dict(model.state_dict())
    for i in range(model.config.num_layers):
        state[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    directory = tmp_path / "bin"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    model.config.save_pretrained(directory)
    ids = random_ids(2, 50, SMALL["vocab_size"])
    assert np.abs(logits(neo_jax.from_pretrained(directory, progress=False), ids) - hf_logits(model, ids)).max() <= TOL


def test_bfloat16_bin_checkpoint(tmp_path):
    model = make_hf_model().to(torch.bfloat16)
    directory = tmp_path / "bf16bin"
    directory.mkdir()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    model.config.save_pretrained(directory)
    ours = neo_jax.from_pretrained(directory, param_dtype=jnp.bfloat16, progress=False)
    wte = np.asarray(ours.wte.embedding[...])
    assert wte.dtype == jnp.bfloat16
    np.testing.assert_array_equal(wte.astype(np.float32), model.transformer.wte.weight.detach().float().numpy())


def test_base_model_checkpoint_without_prefix(tmp_path):
    """A GPTNeoModel (no LM head) saves names without the 'transformer.' prefix. It loads as features, and as a
    causal LM with its head tied to the embeddings."""
    model = make_hf_model()
    model.transformer.save_pretrained(tmp_path / "base")
    ids = random_ids(1, 30, SMALL["vocab_size"])
    features = neo_jax.from_pretrained(tmp_path / "base", progress=False)
    assert features.config.task == "feature-extraction"
    with torch.no_grad():
        expected = model.transformer(torch.tensor(ids)).last_hidden_state.numpy()
    assert np.abs(np.asarray(features(ids)) - expected).max() <= TOL
    ours = neo_jax.from_pretrained(tmp_path / "base", task="causal-lm", progress=False)
    assert np.abs(logits(ours, ids) - hf_logits(model, ids)).max() <= TOL


def test_hub_id_resolves_through_huggingface_hub_cache(tmp_path, monkeypatch, save_hf):
    """The hub path is real huggingface_hub code, run offline against a cache laid out as the hub's."""
    import huggingface_hub.constants

    model = make_hf_model()
    snapshot = tmp_path / "hub" / "models--EleutherAI--gpt-neo-test" / "snapshots" / ("0" * 40)
    shutil.copytree(save_hf(model), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours = neo_jax.from_pretrained("EleutherAI/gpt-neo-test", progress=False)
    assert convert.source_of(ours) == snapshot
    ids = random_ids(1, 30, SMALL["vocab_size"])
    assert np.abs(logits(ours, ids) - hf_logits(model, ids)).max() <= TOL


# ----------------------------------------------------------------------------------------------- export
def test_export_reloads_in_transformers_with_same_logits(hf, tmp_path):
    model, directory = hf
    ours = neo_jax.from_pretrained(directory, progress=False)
    out = neo_jax.save_pretrained(ours, tmp_path / "export", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        np.testing.assert_array_equal(
            f.get_tensor("transformer.h.3.mlp.c_fc.weight"), model.transformer.h[3].mlp.c_fc.weight.detach().numpy()
        )
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 70, SMALL["vocab_size"])
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids)).max() <= 1e-5
    for ours_t, ref_t in zip(reloaded.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(ours_t, ref_t, rtol=0, atol=0)
    assert reloaded.config.attention_layers == model.config.attention_layers


def test_sharded_export(hf, tmp_path):
    model, directory = hf
    out = neo_jax.save_pretrained(
        neo_jax.from_pretrained(directory, progress=False), tmp_path / "e", max_shard_size="60KB", progress=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.transformer.parameters())
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(out).eval()
    ids = random_ids(1, 40, SMALL["vocab_size"])
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids)).max() <= 1e-5


def test_bfloat16_export(hf, tmp_path):
    model, directory = hf
    ours = neo_jax.from_pretrained(directory, dtype="bfloat16", param_dtype="bfloat16", progress=False)
    out = neo_jax.save_pretrained(ours, tmp_path / "bf16", progress=False)
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not iterable) == {"BF16"}
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = model.transformer.wte.weight.detach().to(torch.bfloat16)
    torch.testing.assert_close(reloaded.transformer.wte.weight, expected, rtol=0, atol=0)


def test_tokenizer_files_travel_with_the_model(tmp_path, save_hf):
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # the fixture is GPT-2's tokenizer
    directory = save_hf(make_hf_model())
    tokenizer.save_pretrained(directory)
    ours = neo_jax.from_pretrained(directory, progress=False)
    for fmt in ("hf", "orbax"):
        out = neo_jax.save_pretrained(ours, tmp_path / f"export-{fmt}", format=fmt, progress=False)
        again = transformers.AutoTokenizer.from_pretrained(out)
        assert again("EleutherAI has")["input_ids"] == tokenizer("EleutherAI has")["input_ids"]


def test_orbax_round_trip_is_bit_exact(hf, tmp_path):
    _, directory = hf
    ours = neo_jax.from_pretrained(directory, progress=False)
    out = neo_jax.save_pretrained(ours, tmp_path / "orbax", format="orbax", progress=False)
    assert (out / "params").is_dir() and (out / "config.json").exists()
    again = neo_jax.from_pretrained(out)
    before, after = params(ours), params(again)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype
        np.testing.assert_array_equal(before[key], after[key])
    ids = random_ids(2, 40, SMALL["vocab_size"])
    np.testing.assert_array_equal(logits(again, ids), logits(ours, ids))
    # and back to Hugging Face, still exact
    back = neo_jax.save_pretrained(again, tmp_path / "back", progress=False)
    with safe_open(back / "model.safetensors", "numpy") as a, safe_open(directory / "model.safetensors", "numpy") as b:
        for name in b.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name))


def test_orbax_bfloat16_round_trip(hf, tmp_path):
    _, directory = hf
    ours = neo_jax.from_pretrained(directory, param_dtype="bfloat16", progress=False)
    out = neo_jax.save_pretrained(ours, tmp_path / "o", format="orbax", progress=False)
    again = neo_jax.from_pretrained(out, param_dtype="bfloat16")
    for key, value in params(ours).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, params(again)[key])


def test_streamed_safetensors_match_the_library_reader(tmp_path):
    specs = {
        "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16),
        "a": jax.ShapeDtypeStruct((2, 5), jnp.float32),
        "c": jax.ShapeDtypeStruct((0,), jnp.float32),
    }
    data = {
        "a": np.arange(10, dtype=np.float32).reshape(2, 5),
        "b": np.array([1.5, -2, 3], dtype=jnp.bfloat16),
        "c": np.zeros((0,), np.float32),
    }
    write_safetensors(tmp_path / "x.safetensors", specs, {k: (lambda v=v: v) for k, v in data.items()})
    with safe_open(tmp_path / "x.safetensors", "numpy") as f:
        assert set(f.keys()) == set(data)
        for key, value in data.items():
            np.testing.assert_array_equal(f.get_tensor(key), value)
            assert f.get_tensor(key).dtype == value.dtype


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_weights_file(hf):
    _, directory = hf
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        neo_jax.from_pretrained(directory, progress=False)


def test_missing_shard_named_in_index(save_hf):
    directory = save_hf(make_hf_model(), max_shard_size="100KB")
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        neo_jax.from_pretrained(directory, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(hf, damage):
    _, directory = hf
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        neo_jax.from_pretrained(directory, progress=False)


def test_corrupt_bin(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)
    transformers.GPTNeoConfig(**SMALL).save_pretrained(directory)
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        neo_jax.from_pretrained(directory, progress=False)


def test_shape_mismatch_names_tensor_and_both_shapes(hf):
    _, directory = hf
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        neo_jax.from_pretrained(directory, progress=False)
    message = str(info.value)
    assert "tensor transformer.wte.weight has shape (320, 64) but the config needs (320, 32)" in message


def test_missing_and_unexpected_tensors(hf):
    model, directory = hf
    state = {k: v for k, v in model.state_dict().items() if k != "transformer.h.2.ln_1.bias"}
    state["transformer.h.9.mlp.extra"] = torch.zeros(3)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        neo_jax.from_pretrained(directory, progress=False)
    message = str(info.value)
    assert "missing tensor transformer.h.2.ln_1.bias (expected shape (64,))" in message
    assert "unexpected tensor transformer.h.9.mlp.extra (3,)" in message


def test_missing_config_and_bad_source(tmp_path, hf):
    _, directory = hf
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        neo_jax.from_pretrained(directory, progress=False)
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a Hugging Face hub id"):
        neo_jax.from_pretrained(str(tmp_path / "no" / "such" / "dir"), progress=False)
    with pytest.raises(FileNotFoundError, match="^nowhere/none cannot be downloaded: .* not in the local cache"):
        neo_jax.from_pretrained("nowhere/none", progress=False)  # offline here, as with no network


def test_invalid_config_json(hf):
    _, directory = hf
    config = json.loads((directory / "config.json").read_text())
    config["attention_types"] = [[["global", "sparse"], 2]]
    config.pop("attention_layers", None)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown attention type"):
        neo_jax.from_pretrained(directory, progress=False)


def test_existing_output_is_not_clobbered(hf, tmp_path):
    _, directory = hf
    ours = neo_jax.from_pretrained(directory, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        neo_jax.save_pretrained(ours, out, progress=False)
    # overwrite replaces a model directory only: a file no save writes is named, and nothing is touched
    with pytest.raises(FileExistsError, match="holds 'keep.txt', which is not a saved model's file"):
        neo_jax.save_pretrained(ours, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    neo_jax.save_pretrained(ours, out, progress=False, format="orbax")
    neo_jax.save_pretrained(ours, out, overwrite=True, progress=False)  # an orbax model replaced by an hf one
    assert (out / "model.safetensors").exists() and not (out / "params").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporary directories left


def test_failed_export_leaves_nothing_half_written(hf, tmp_path, monkeypatch):
    _, directory = hf
    ours = neo_jax.from_pretrained(directory, progress=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(neo_jax.hf, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        neo_jax.save_pretrained(ours, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
