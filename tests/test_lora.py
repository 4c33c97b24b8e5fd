"""LoRA adapters against Hugging Face PEFT on the same random weights: PEFT's adapters imported, ours
exported and loaded by PEFT, merged exports, generation with an unmerged adapter, and bad adapters."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import neo_jax
import neo_jax.peft
from neo_jax import lora, sharding
from tests.conftest import SMALL, hf_logits, make_hf_model

ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def peft_adapter(directory, seed: int = 1, **settings):
    """A PEFT adapter on make_hf_model()'s weights with every B non-zero (PEFT starts B at zero), saved."""
    model = peft.get_peft_model(make_hf_model(), peft.LoraConfig(**{"r": 4, "lora_alpha": 16, **settings}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    make_hf_model().save_pretrained(directory)
    return directory


IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, 40))  # crosses the window (16)


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ALL, "use_rslora": True, "r": 3},
        {"target_modules": "all-linear", "lora_alpha": 5},
    ],
)
def test_a_peft_adapter_gives_peft_logits(base_dir, tmp_path, settings):
    reference = peft_adapter(tmp_path / "adapter", **settings)
    model = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "adapter", progress=False)
    np.testing.assert_allclose(np.asarray(model(IDS)), hf_logits(reference, IDS), atol=1e-4, rtol=0)


def test_an_adapter_from_here_loads_in_peft_without_warnings_and_merges(base_dir, tmp_path):
    model = neo_jax.from_pretrained(base_dir, progress=False)
    lora.add(model, lora.LoRAConfig(r=4, alpha=12, targets=("k_proj", "out_proj", "c_fc", "c_proj")), seed=3)
    for _, dense in lora.adapted_layers(model):  # train-like: B away from zero
        if dense.lora is not None:
            dense.lora.b.set_value(jax.random.normal(jax.random.key(7), dense.lora.b.shape) * 0.1)
    ours = np.asarray(model(IDS))
    neo_jax.peft.save(model, tmp_path / "out", base_model=str(base_dir))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["base_model_name_or_path"] == str(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_hf_model(), tmp_path / "out").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    np.testing.assert_allclose(hf_logits(theirs, IDS), ours, atol=1e-4, rtol=0)
    # Round trip back, then merged into the weights: the same logits.
    again = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "out", progress=False)
    np.testing.assert_allclose(np.asarray(again(IDS)), ours, atol=1e-6, rtol=0)
    lora.merge(again)
    assert not lora.has_lora(again)
    np.testing.assert_allclose(np.asarray(again(IDS)), ours, atol=1e-5, rtol=0)


def test_generation_with_an_unmerged_adapter_equals_the_merged_model(base_dir, tmp_path):
    peft_adapter(tmp_path / "adapter", target_modules=ALL)
    unmerged = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "adapter", progress=False)
    merged = lora.merge(neo_jax.from_pretrained(base_dir, adapter=tmp_path / "adapter", progress=False))
    prompt = IDS[:, :12]
    np.testing.assert_array_equal(
        neo_jax.generate(unmerged, prompt, max_new_tokens=30), neo_jax.generate(merged, prompt, max_new_tokens=30)
    )


def test_new_adapters_start_as_peft_does_and_carry_logical_axes(base_dir):
    model = neo_jax.from_pretrained(base_dir, progress=False)
    before = np.asarray(model(IDS))
    lora.add(model, lora.LoRAConfig(r=8, targets=("q_proj", "c_fc")))
    np.testing.assert_array_equal(np.asarray(model(IDS)), before)  # B = 0: nothing changes
    dense = model.periods[0].mlp.c_fc
    a, b = dense.lora.a, dense.lora.b
    assert isinstance(a, lora.LoRAParam) and isinstance(a, neo_jax.model.nnx.Param)
    bound = 1 / np.sqrt(SMALL["hidden_size"])  # Kaiming-uniform with a = sqrt(5), as PEFT
    assert np.abs(np.asarray(a[...])).max() <= bound and np.asarray(a[...]).std() > bound / 3
    assert a.get_metadata()["out_sharding"] == ("layers", None, "embed")
    assert b.get_metadata()["out_sharding"] == ("layers", "mlp", None)
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}  # B's rows split like c_fc's output, A's columns like its input
    assert sharding.spec(("layers", "mlp", None), b.shape, sizes) == jax.sharding.PartitionSpec(None, "tensor", None)
    assert sharding.spec(a.get_metadata()["out_sharding"], a.shape, sizes)[2] == "fsdp"


def write_adapter(directory, config_changes=None, drop=None, reshape=None):
    """A valid adapter from PEFT, then one thing broken."""
    peft_adapter(directory, target_modules=["q_proj", "v_proj"])
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes or {})
    path.write_text(json.dumps(config))
    if drop or reshape:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(directory / "adapter_model.safetensors")
        for name in list(tensors):
            if drop and drop in name:
                del tensors[name]
            elif reshape and reshape in name:
                tensors[name] = np.zeros((tensors[name].shape[0], tensors[name].shape[1] + 1), np.float32)
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(config_changes={"use_dora": True}), "use_dora"),
        (dict(config_changes={"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (dict(config_changes={"layers_to_transform": [0]}), "layers_to_transform"),
        (dict(config_changes={"peft_type": "IA3"}), "peft_type"),
        (dict(config_changes={"target_modules": ".*proj"}), "pattern"),
        (dict(config_changes={"target_modules": ["q_proj", "lm_head"]}), "lm_head"),
        (dict(config_changes={"init_lora_weights": "pissa"}), "init_lora_weights"),
        (dict(config_changes={"bias": "all"}), "bias"),
        (dict(config_changes={"r": 0}), "rank"),
        (dict(drop="h.1.attn.attention.v_proj.lora_B"), "missing"),
        (dict(reshape="lora_A"), "another base model"),
    ],
)
def test_bad_adapters_are_refused_before_weights_load(base_dir, tmp_path, change, message):
    write_adapter(tmp_path / "adapter", **change)
    with pytest.raises(ValueError, match=message) as error:
        neo_jax.from_pretrained(base_dir, adapter=tmp_path / "adapter", progress=False)
    assert "\n" not in str(error.value)


def test_bad_lora_settings():
    for settings, message in [
        (dict(r=0), "rank"),
        (dict(r=2.5), "rank"),
        (dict(r=4, targets=("q_proj", "wte")), "targets"),
        (dict(r=4, targets=()), "targets"),
        (dict(r=4, alpha=float("nan")), "alpha"),
        (dict(r=4, dropout=1.0), "dropout"),
    ]:
        with pytest.raises(ValueError, match=message):
            lora.LoRAConfig(**settings)


def test_five_adamw_steps_match_peft_and_torch(base_dir, tmp_path):
    from neo_jax.train import make_optimizer, train_step

    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_fc"], lora_dropout=0.0)
    torch.manual_seed(0)
    reference = peft.get_peft_model(make_hf_model(), settings)
    reference.save_pretrained(tmp_path / "start")  # PEFT's own initial adapters (B = 0), shared by both sides
    ours = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "start", progress=False)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * SMALL["num_layers"]
    torch_adamw = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimizer = make_optimizer(ours, learning_rate=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(5)
    for step in range(5):
        batch = rng.integers(0, SMALL["vocab_size"], (4, 24))
        torch_adamw.zero_grad()
        loss = reference(torch.as_tensor(batch), labels=torch.as_tensor(batch)).loss
        loss.backward()
        torch_adamw.step()
        metrics = train_step(ours, optimizer, batch)
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4, err_msg=f"step {step}")
    neo_jax.peft.save(ours, tmp_path / "ours")
    from safetensors.numpy import load_file

    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    reference.save_pretrained(tmp_path / "theirs")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    difference = np.sqrt(sum(((mine[k] - theirs[k]) ** 2).sum() for k in theirs))
    norm = np.sqrt(sum((theirs[k] ** 2).sum() for k in theirs))
    assert difference <= 1e-3 * norm, (difference, norm)
    # Only the adapters trained: the base weights are where they started.
    base = neo_jax.from_pretrained(base_dir, progress=False)
    np.testing.assert_array_equal(
        np.asarray(ours.periods[0].attn.q_proj.kernel[...]), np.asarray(base.periods[0].attn.q_proj.kernel[...])
    )


def test_lora_dropout_is_peft_s_given_the_same_masks(base_dir, tmp_path):
    """Dropout on each adapter's input, scaled by 1/(1-p), the frozen layer seeing the whole input: the masks
    a train step draws here, put into PEFT's dropout modules, give PEFT's losses and AdamW steps; the same key
    gives the same step, another key another, and the forward pass outside training does not drop."""
    import jax.numpy as jnp

    from neo_jax.train import make_optimizer, token_losses, train_step

    p, targets = 0.3, ["q_proj", "out_proj", "c_fc", "c_proj"]
    reference = peft_adapter(tmp_path / "start", target_modules=targets, lora_dropout=p).train()
    ours = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "start", progress=False)
    before = np.asarray(ours(IDS))
    assert lora.has_dropout(ours)
    np.testing.assert_allclose(before, hf_logits(reference.eval(), IDS), atol=1e-4, rtol=0)  # eval: no dropout
    reference.train()
    size, parts = len(ours.config.layer_period), {"q_proj": "attn", "out_proj": "attn", "c_fc": "mlp", "c_proj": "mlp"}

    class Masked(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = torch.tensor(np.asarray(mask))

        def forward(self, x):
            return x * self.mask / (1 - p)

    def use_masks(key, shape):
        """Put the masks that ``with_dropout(key)`` makes for each layer into PEFT's dropout modules."""
        probe = lora.with_dropout(neo_jax.from_pretrained(base_dir, adapter=tmp_path / "start", progress=False), key)
        for layer, block in enumerate(reference.base_model.model.transformer.h):
            for name, part in parts.items():
                module = getattr(block.attn.attention if part == "attn" else block.mlp, name)
                adapter = getattr(getattr(probe.periods[layer % size], part), name).lora
                mask = jax.random.bernoulli(adapter.keys[...][layer // size], 1 - p, (*shape, module.in_features))
                module.lora_dropout["default"] = Masked(mask)

    torch_adamw = torch.optim.AdamW([q for q in reference.parameters() if q.requires_grad], lr=1e-3)
    optimizer = make_optimizer(ours, learning_rate=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(7)
    for step in range(2):
        batch, key = rng.integers(0, SMALL["vocab_size"], (2, 24)), jax.random.fold_in(jax.random.key(3), step)
        use_masks(key, batch.shape)
        torch_adamw.zero_grad()
        loss = reference(torch.as_tensor(batch), labels=torch.as_tensor(batch)).loss
        loss.backward()
        torch_adamw.step()
        undropped = float(token_losses(ours, batch)[0]) / (batch.size - batch.shape[0])
        assert abs(undropped - loss.item()) > 1e-3  # the masks matter
        metrics = train_step(ours, optimizer, batch, rng=key)
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4, err_msg=f"step {step}")
    neo_jax.peft.save(ours, tmp_path / "ours")
    reference.save_pretrained(tmp_path / "theirs")
    from safetensors.numpy import load_file

    mine, theirs = (
        load_file(tmp_path / "ours" / neo_jax.peft.ADAPTER_WEIGHTS),
        load_file(tmp_path / "theirs" / neo_jax.peft.ADAPTER_WEIGHTS),
    )
    difference = np.sqrt(sum(((mine[k] - theirs[k]) ** 2).sum() for k in theirs))
    assert difference <= 1e-3 * np.sqrt(sum((theirs[k] ** 2).sum() for k in theirs))
    # Keys: the same key gives the same step, another key another; a dropout model needs one.
    losses = []
    for key in (1, 1, 2):
        model = neo_jax.from_pretrained(base_dir, adapter=tmp_path / "start", progress=False)
        losses.append(float(train_step(model, make_optimizer(model), IDS, rng=jax.random.key(key))["loss"]))
    assert losses[0] == losses[1] != losses[2]
    with pytest.raises(ValueError, match="rng"):
        train_step(model, make_optimizer(model), jnp.asarray(IDS))


def test_lora_optimizer_state_is_a_sliver_of_full_fine_tuning():
    """r = 8 on q, v of the 125M shape: the optimizer state, measured from the compiled train step's
    arguments (abstract model, nothing allocated), is under 1% of full fine-tuning's."""
    from flax import nnx

    from neo_jax.config import GPTNeoConfig
    from neo_jax.model import init_model
    from neo_jax.train import make_optimizer

    config = GPTNeoConfig.from_json_file("configs/gpt-neo-125M.json")

    def state_bytes(with_lora: bool) -> int:
        def build():
            model = init_model(config)
            if with_lora:
                lora.add(model, lora.LoRAConfig(r=8, targets=("q_proj", "v_proj")))
            return nnx.state(make_optimizer(model), nnx.optimizer.OptState)

        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(build)))

    full, adapters = state_bytes(False), state_bytes(True)
    assert adapters <= 0.01 * full, (adapters, full)


def test_cli_merges_an_adapter_into_a_hugging_face_export(base_dir, tmp_path, capsys):
    from neo_jax.cli import main

    reference = peft_adapter(tmp_path / "adapter", target_modules=ALL)
    assert (
        main(
            [
                "convert",
                str(base_dir),
                str(tmp_path / "merged"),
                "--to",
                "hf",
                "--adapter",
                str(tmp_path / "adapter"),
                "--merge",
            ]
        )
        == 0
    )
    merged = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, IDS), hf_logits(reference, IDS), atol=1e-4, rtol=0)
    assert main(["convert", str(base_dir), str(tmp_path / "x"), "--adapter", str(tmp_path / "adapter")]) == 2
    assert "--merge" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="LoRA adapters"):
        neo_jax.save_pretrained(
            neo_jax.from_pretrained(base_dir, adapter=tmp_path / "adapter", progress=False), tmp_path / "y"
        )


# ---- LoRA fine-tuning runs ---------------------------------------------------------------------------------
LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "16", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj,c_fc"]


@pytest.fixture(scope="module")
def lora_run(gpt2_model_dir, tmp_path_factory):
    from tests.test_finetune import finish, flags, launch

    output = tmp_path_factory.mktemp("lora") / "run"
    result = finish(launch(flags(gpt2_model_dir, output) + LORA_FLAGS))
    assert result["stopped"] == "done"
    return output


def test_a_lora_run_trains_and_saves_only_the_adapters(gpt2_model_dir, lora_run):
    from tests.test_finetune import metrics

    records = metrics(lora_run)
    assert records[-1]["loss"] < records[0]["loss"]
    step = max(int(p.name) for p in (lora_run / "checkpoints").iterdir() if p.name.isdigit())
    saved = json.loads((lora_run / "checkpoints" / str(step) / "params" / "_METADATA").read_text())
    names = [str(k) for k in saved["tree_metadata"]]
    assert names and all("lora" in n for n in names), names[:5]  # adapters only, no base weight
    # The run's adapter directory is PEFT's, and from_pretrained(run) is base + adapters.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(
            transformers.GPTNeoForCausalLM.from_pretrained(gpt2_model_dir), lora_run / "adapter"
        ).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    ids = np.random.default_rng(1).integers(0, 50257, (1, 20))
    ours = np.asarray(neo_jax.from_pretrained(lora_run, progress=False)(ids))
    np.testing.assert_allclose(ours, hf_logits(theirs, ids), atol=1e-4, rtol=0)
    base = neo_jax.from_pretrained(gpt2_model_dir, progress=False)
    assert np.abs(ours - np.asarray(base(ids))).max() > 1e-3  # the adapters did change the model


def test_a_lora_run_cut_by_sigterm_resumes_exactly(gpt2_model_dir, lora_run, tmp_path):
    import signal

    from tests.test_finetune import finish, flags, launch, metrics, wait_for

    output = tmp_path / "run"
    args = flags(gpt2_model_dir, output) + LORA_FLAGS
    process = launch(args)
    assert wait_for(lambda: (output / "metrics.jsonl").exists() and len(metrics(output)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert finish(process)["stopped"] == "sigterm"
    assert finish(launch(args))["stopped"] == "done"
    ours, reference = metrics(output), metrics(lora_run)
    assert [r["step"] for r in ours] == [r["step"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in reference], rtol=1e-6)


def test_lora_settings_on_a_full_run_are_refused_before_loading(gpt2_model_dir, tmp_path):
    import yaml

    from neo_jax.finetune import FinetuneConfig, check
    from tests.test_finetune import ENGLISH

    output = tmp_path / "run"
    output.mkdir()
    common = dict(model=str(gpt2_model_dir), data=ENGLISH, seq_len=64)
    full = FinetuneConfig.load(None, output=str(output), **common)
    written = {k: v for k, v in full.to_dict().items() if not k.startswith("lora_")}  # as runs before LoRA wrote it
    (output / "run.yaml").write_text(yaml.safe_dump(written))
    check(full)  # the same settings resume
    with pytest.raises(ValueError, match="lora_rank: 0 -> 4"):
        check(FinetuneConfig.load(None, output=str(output), lora_rank=4, **common))
    for bad, message in [
        ({"lora_rank": -1}, "lora_rank"),
        ({"lora_rank": 2, "lora_targets": "q_proj,lm_head"}, "targets"),
        ({"lora_rank": 2, "lora_dropout": 1.0}, "dropout"),
    ]:
        with pytest.raises(ValueError, match=message):
            check(FinetuneConfig.load(None, output=str(tmp_path / "n"), **common, **bad))


def test_a_lora_run_converts_to_peft_and_to_merged_weights(gpt2_model_dir, lora_run, tmp_path):
    from neo_jax.cli import main

    assert main(["convert", str(lora_run), str(tmp_path / "peft"), "--to", "peft"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gpt2_model_dir) and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(
        transformers.GPTNeoForCausalLM.from_pretrained(gpt2_model_dir), tmp_path / "peft"
    )
    assert main(["convert", str(lora_run), str(tmp_path / "merged"), "--to", "hf", "--merge"]) == 0
    merged = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = np.random.default_rng(2).integers(0, 50257, (1, 20))
    np.testing.assert_allclose(hf_logits(merged, ids), hf_logits(theirs.eval(), ids), atol=1e-4, rtol=0)
    assert main(["convert", str(gpt2_model_dir), str(tmp_path / "none"), "--to", "peft"]) == 2
    assert not (tmp_path / "none").exists()


def test_training_goes_on_from_a_peft_adapter(gpt2_model_dir, tmp_path):
    from tests.test_finetune import finish, flags, launch, metrics

    base = transformers.GPTNeoForCausalLM.from_pretrained(gpt2_model_dir)
    start = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "c_proj"]))
    start.save_pretrained(tmp_path / "start")
    output = tmp_path / "run"
    result = finish(
        launch(
            flags(gpt2_model_dir, output, steps=4, save_every=2, eval_every=0) + ["--adapter", str(tmp_path / "start")]
        )
    )
    assert result["stopped"] == "done" and len(metrics(output)) == 4
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["k_proj", "c_proj"]
    both = flags(gpt2_model_dir, tmp_path / "other") + ["--adapter", str(tmp_path / "start"), "--lora-rank", "4"]
    process = launch(both)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "not both" in err


def test_a_lora_run_on_an_int8_base_trains_adapters_and_exports_merged_float_weights(gpt2_model_dir, tmp_path):
    """--lora-base int8 (QLoRA-style): the loss falls with only the adapters in the checkpoints; --export-hf
    merges them into the float base; the run reloads with its adapters on either base; full fine-tuning
    refuses the setting."""
    from tests.test_finetune import finish, flags, launch, metrics

    output, export = tmp_path / "run", tmp_path / "hf"
    args = flags(gpt2_model_dir, output, steps=6, save_every=3, eval_every=0, export_hf=str(export))
    result = finish(launch(args + LORA_FLAGS + ["--lora-base", "int8"]))
    assert result["stopped"] == "done"
    records = metrics(output)
    assert records[-1]["loss"] < records[0]["loss"]
    saved = json.loads((output / "checkpoints" / "6" / "params" / "_METADATA").read_text())
    assert all("lora" in str(k) for k in saved["tree_metadata"])
    ids = np.random.default_rng(3).integers(0, 50257, (1, 16))
    floats = neo_jax.from_pretrained(output, progress=False)
    merged = transformers.GPTNeoForCausalLM.from_pretrained(export).eval()
    np.testing.assert_allclose(hf_logits(merged, ids), np.asarray(floats(ids)), atol=1e-4, rtol=0)
    ints = neo_jax.from_pretrained(output, weights="int8", progress=False)
    assert ints.periods[0].attn.q_proj.kernel.dtype == np.int8 and lora.has_lora(ints)
    process = launch(flags(gpt2_model_dir, tmp_path / "full") + ["--lora-base", "int8"])
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "--lora-rank" in err


def test_a_bfloat16_lora_run_trains_and_reloads_with_float32_adapters(gpt2_model_dir, tmp_path):
    from tests.test_finetune import finish, flags, launch, metrics

    output = tmp_path / "run"
    result = finish(
        launch(flags(gpt2_model_dir, output, steps=3, save_every=3, eval_every=0, dtype="bfloat16") + LORA_FLAGS)
    )
    assert result["stopped"] == "done" and all(np.isfinite(r["loss"]) for r in metrics(output))
    model = neo_jax.from_pretrained(output, dtype="bfloat16", param_dtype="bfloat16", progress=False)
    assert model.periods[0].attn.q_proj.kernel.dtype == np.dtype("bfloat16")
    assert model.periods[0].attn.q_proj.lora.a.dtype == np.float32  # the adapters stay float32


def test_plan_compiles_a_lora_step_for_a_tpu():
    """XLA:TPU's own figures (through libtpu, on this CPU) for a 2-layer 125M LoRA step on v5e-1: the
    arguments are the bfloat16 base plus the adapters and their AdamW state, about half the bytes of full
    fine-tuning's float32 weights alone, and the estimate's trained bytes are the adapters'."""
    from neo_jax import plan
    from tests.test_aot import few_layers

    config = few_layers("125M")
    settings = lora.LoRAConfig(r=16, targets=("q_proj", "v_proj"))
    options = dict(batch=1, seq=512, topology="v5e-1")
    adapters = plan.train_report(config, **options, lora=settings)
    full = plan.train_report(config, **options)
    adapter_bytes = 2 * 2 * 16 * 768 * 4  # two layers, A and B, r x 768 each, float32
    assert adapters["gradients"] == 2 * adapter_bytes and adapters["optimizer_state"] == 4 * adapter_bytes
    assert adapters["parameters"] < 0.55 * full["parameters"]  # the base in bfloat16
    base_and_state = adapters["parameters"] + adapters["optimizer_state"]
    assert base_and_state <= adapters["arguments"] <= 1.05 * base_and_state
    assert adapters["arguments"] < 0.2 * full["arguments"]  # full: float32 weights + two AdamW moments


def test_lm_eval_model_takes_a_peft_adapter(gpt2_model_dir, tmp_path):
    from neo_jax.lm_eval import NeoJaxLM

    base = transformers.GPTNeoForCausalLM.from_pretrained(gpt2_model_dir)
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    evaluated = NeoJaxLM(str(gpt2_model_dir), peft=str(tmp_path / "adapter"))
    assert lora.has_lora(evaluated.model)
    expected = neo_jax.from_pretrained(gpt2_model_dir, adapter=tmp_path / "adapter", progress=False)
    np.testing.assert_array_equal(np.asarray(evaluated.model(IDS)), np.asarray(expected(IDS)))
