"""Checks on a simulated 8-device CPU mesh. They need JAX_NUM_CPU_DEVICES=8 set before JAX starts, so
tests/test_sharding.py runs this file in its own pytest process; the file name keeps the main run from
collecting it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import neo_jax
from neo_jax import attention, sharding
from neo_jax.train import make_optimizer, train_step
from tests.conftest import SMALL

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]
# The rules, written out independently of neo_jax.sharding: logical name -> mesh axes.
RULES = {"embed": ("fsdp",), "heads": ("tensor",), "mlp": ("tensor",), "vocab": ("tensor",)}


def test_eight_devices():
    assert jax.device_count() == 8, "run with JAX_NUM_CPU_DEVICES=8"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.GPTNeoConfig(**{**SMALL, "window_size": 8})
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf")
    transformers.GPTNeoForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def single(checkpoint):
    return neo_jax.from_pretrained(checkpoint, progress=False)


def leaves(model):
    return jax.tree_util.tree_leaves_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def expected_shard_shape(names, shape, mesh):
    out, used = [], set()
    for name, size in zip(names, shape):
        axes = [a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used]
        parts = math.prod(mesh.shape[a] for a in axes)
        if axes and size % parts == 0:
            used.update(axes)
            size //= parts
        out.append(size)
    return tuple(out)


@pytest.mark.parametrize("shape", MESHES)
def test_parameters_are_sharded_as_the_rules_say(checkpoint, shape):
    mesh = sharding.make_mesh(*shape)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    split = 0
    for path, variable in leaves(model):
        array = variable.get_value()
        expected = expected_shard_shape(variable.get_metadata()["out_sharding"], array.shape, mesh)
        assert array.addressable_shards[0].data.shape == expected, jax.tree_util.keystr(path)
        assert len(array.addressable_shards) == 8
        split += expected != array.shape
    assert (split > 0) == (shape != (8, 1, 1))  # pure data parallelism replicates every parameter


@pytest.mark.parametrize("shape", MESHES)
def test_logits_equal_one_device(checkpoint, single, shape):
    mesh = sharding.make_mesh(*shape)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (8, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    batch = sharding.batch_sharding(mesh, ids.shape)
    out = nnx.jit(lambda m, x, a: m(x, attention_mask=a))(
        model, jax.device_put(ids, batch), jax.device_put(mask, batch)
    )
    assert out.sharding.mesh == mesh
    np.testing.assert_allclose(np.asarray(out), np.asarray(single(ids, attention_mask=mask)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_a_classifiers_every_layer_on_a_mesh_equals_one_device_and_is_split(checkpoint, tmp_path, shape):
    """A token classifier's logits, hidden states and attention probabilities on a mesh equal one device's; the
    compiled program's outputs per device are the whole outputs split over the batch (data x fsdp) and, for
    the attentions, over the heads (tensor)."""
    directory = tmp_path / "classifier"
    neo_jax.save_pretrained(neo_jax.from_pretrained(checkpoint, task="token-classification", progress=False), directory)
    single = neo_jax.from_pretrained(directory, progress=False)
    mesh = sharding.make_mesh(*shape)
    model = neo_jax.from_pretrained(directory, mesh=mesh, progress=False)
    ids = np.random.default_rng(3).integers(0, SMALL["vocab_size"], (8, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    batch = sharding.batch_sharding(mesh, ids.shape)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, a: nnx.merge(graphdef, s)(x, a, output_hidden_states=True, output_attentions=True))
    args = (state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    with sharding.use_mesh(mesh):
        out = forward(*args)
        compiled = forward.lower(*args).compile()
    expected = single(ids, mask, output_hidden_states=True, output_attentions=True)
    for mine, theirs in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-5, rtol=0)
    split = {x.shape: math.prod(x.shape) // math.prod(x.addressable_shards[0].data.shape) for x in jax.tree.leaves(out)}
    replicas = shape[0] * shape[1]
    assert split[(8, SMALL["num_heads"], 40, 40)] == replicas * shape[2]  # batch over data x fsdp, heads over tensor
    assert split[(8, 40, SMALL["hidden_size"])] == replicas
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(expected))
    per_device = compiled.memory_analysis().output_size_in_bytes  # XLA's own figure for one device
    assert per_device <= whole / replicas * 1.05, (per_device, whole)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_embeddings_on_a_mesh_equal_one_device_and_are_split_by_batch(checkpoint, single, shape):
    """``neo-jax embed``'s program on a mesh: every pooling's vectors equal one device's, and XLA's output per
    device is the batch's rows over data x fsdp."""
    from neo_jax.embed import Embedder

    mesh = sharding.make_mesh(*shape)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    rng = np.random.default_rng(4)
    texts = [rng.integers(0, SMALL["vocab_size"], int(n)).tolist() for n in rng.integers(1, 90, 16)]
    for pooling in ("mean", "weightedmean", "last"):
        options = dict(pooling=pooling, normalize=pooling == "mean", batch_size=8)
        np.testing.assert_allclose(
            Embedder(model, **options)(texts), Embedder(single, **options)(texts), atol=1e-5, rtol=0
        )
    embedder = Embedder(model, batch_size=8)
    out = embedder.run(texts[:8])
    assert out.addressable_shards[0].data.shape == (8 // (shape[0] * shape[1]), SMALL["hidden_size"])
    compiled = embedder.compile(96)
    assert compiled.memory_analysis().output_size_in_bytes == 8 // (shape[0] * shape[1]) * SMALL["hidden_size"] * 4


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_splash_on_a_mesh_equals_one_device(checkpoint, single, shape):
    """Splash (in Pallas' interpret mode) under the mesh runs once per shard of the batch and heads, inside a
    manual (shard_map) computation; every real token's logits equal one device's dense ones."""
    mesh = sharding.make_mesh(*shape)
    ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (8, 150)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    batch = sharding.batch_sharding(mesh, ids.shape)
    with attention.splash_interpret():
        model = neo_jax.from_pretrained(checkpoint, mesh=mesh, attention="splash", progress=False)
    with attention.splash_interpret(), sharding.use_mesh(mesh):
        forward = nnx.jit(lambda m, x, a: m(x, attention_mask=a))
        args = (model, jax.device_put(ids, batch), jax.device_put(mask, batch))
        assert "manual_computation" in forward.lower(*args).as_text()
        out = np.asarray(forward(*args))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], np.asarray(single(ids, attention_mask=mask))[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (2, 1, 4)])  # fsdp alone, every axis, tensor-heavy
def test_greedy_generation_is_identical(checkpoint, single, shape):
    model = neo_jax.from_pretrained(checkpoint, mesh=sharding.make_mesh(*shape), progress=False)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, SMALL["vocab_size"], (8, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[3, :2] = 0
    ours = neo_jax.generate(model, ids, mask, max_new_tokens=30)
    np.testing.assert_array_equal(ours, neo_jax.generate(single, ids, mask, max_new_tokens=30))
    for draft in (model, "ngram"):  # speculative decoding: the same tokens, the draft on the same mesh
        spec = neo_jax.generate(model, ids, mask, max_new_tokens=30, draft=draft, num_draft_tokens=3)
        np.testing.assert_array_equal(spec, ours)
    beams = neo_jax.generate(model, ids[:2], mask[:2], max_new_tokens=10, num_beams=3)
    np.testing.assert_array_equal(beams, neo_jax.generate(single, ids[:2], mask[:2], max_new_tokens=10, num_beams=3))


def params(model):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }


def two_train_steps(checkpoint, mesh):
    """An SGD step then an AdamW step on a fixed batch: the losses, the parameters after the SGD step and
    after both."""
    ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (8, 32)).astype(np.int32)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    batch = ids if mesh is None else jax.device_put(ids, sharding.batch_sharding(mesh, ids.shape))
    # SGD keeps the comparison linear in the gradients; AdamW's first step divides by |g| and so
    # magnifies last-bit differences in tiny gradients.
    sgd = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    losses = [float(train_step(model, sgd, batch)["loss"])]
    after_sgd = params(model)
    adamw = make_optimizer(model, learning_rate=1e-3)
    losses.append(float(train_step(model, adamw, batch)["loss"]))
    return losses, after_sgd, params(model)


@pytest.fixture(scope="module")
def single_train(checkpoint):
    return two_train_steps(checkpoint, None)


@pytest.mark.parametrize("shape", MESHES)
def test_train_step_gives_the_same_loss_and_parameters(checkpoint, single_train, shape):
    single_losses, single_sgd, single_params = single_train
    mesh_losses, mesh_sgd, mesh_params = two_train_steps(checkpoint, sharding.make_mesh(*shape))
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
    for key, value in single_sgd.items():
        np.testing.assert_allclose(mesh_sgd[key], value, atol=1e-6, err_msg=key)  # the SGD step: closely
    for key, value in single_params.items():
        np.testing.assert_allclose(mesh_params[key], value, atol=2e-4, err_msg=key)  # after AdamW: |Δ| << lr


def test_random_init_under_a_mesh_is_born_sharded():
    config = neo_jax.GPTNeoConfig(**{**SMALL, "attention_types": ((("global", "local"), 2),)})
    mesh = sharding.make_mesh(2, 2, 2)
    model = neo_jax.init_model(config, seed=4, mesh=mesh)
    for path, variable in leaves(model):
        array = variable.get_value()
        assert array.addressable_shards[0].data.shape == expected_shard_shape(
            variable.get_metadata()["out_sharding"], array.shape, mesh
        ), jax.tree_util.keystr(path)
    one = params(neo_jax.init_model(config, seed=4))
    for key, value in params(model).items():  # the same draws (compiled vs eager rounding aside)
        np.testing.assert_allclose(value, one[key], atol=1e-7, rtol=0)


def test_orbax_restores_straight_into_shards(checkpoint, single, tmp_path):
    out = neo_jax.save_pretrained(single, tmp_path / "orbax", format="orbax", progress=False)
    mesh = sharding.make_mesh(1, 2, 4)
    model = neo_jax.from_pretrained(out, mesh=mesh, progress=False)
    kernel = model.periods[0].mlp.c_fc.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    for key, value in params(single).items():
        np.testing.assert_array_equal(params(model)[key], value)


def test_batch_is_split_over_data_and_fsdp():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.batch_sharding(mesh, (8, 16)).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    x = jax.device_put(jnp.zeros((8, 16)), sharding.batch_sharding(mesh, (8, 16)))
    assert x.addressable_shards[0].data.shape == (2, 16)


@pytest.mark.parametrize("shape", MESHES)
def test_plan_parameter_bytes_equal_the_real_shards(checkpoint, shape):
    from neo_jax.plan import plan

    mesh = sharding.make_mesh(*shape)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    device = jax.devices()[0]
    real = sum(
        shard.data.nbytes
        for _, variable in leaves(model)
        for shard in variable.get_value().addressable_shards
        if shard.device == device
    )
    planned = plan(model.config, dict(zip(sharding.AXES, shape)), batch=8, seq=64)
    assert planned["parameters"] == real
    assert planned["optimizer_state"] == 2 * real


def test_shard_model_moves_a_loaded_model_onto_the_mesh(checkpoint, single):
    mesh = sharding.make_mesh(1, 2, 4)
    moved = sharding.shard_model(neo_jax.from_pretrained(checkpoint, progress=False), mesh)
    loaded = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    for (_, a), (_, b) in zip(leaves(moved), leaves(loaded)):
        assert a.get_value().sharding == b.get_value().sharding
    for key, value in params(single).items():
        np.testing.assert_array_equal(params(moved)[key], value)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_scoring_and_perplexity_equal_one_device(checkpoint, single, shape):
    from neo_jax.evaluate import perplexity, score

    model = neo_jax.from_pretrained(checkpoint, mesh=sharding.make_mesh(*shape), progress=False)
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, SMALL["vocab_size"], n).tolist() for n in (5, 40, 17, 2, 33)]
    for (a, greedy_a), (b, greedy_b) in zip(
        score(model, sequences, batch_size=4), score(single, sequences, batch_size=4)
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_array_equal(greedy_a, greedy_b)
    tokens = rng.integers(0, SMALL["vocab_size"], 300).tolist()
    sharded, one = (perplexity(m, tokens, seq_len=64, stride=24, batch_size=4) for m in (model, single))
    assert sharded["tokens"] == one["tokens"] == 299
    assert math.isclose(sharded["nll"], one["nll"], rel_tol=1e-6)


def test_lm_eval_adapter_on_a_mesh_equals_one_device(checkpoint, tmp_path):
    import shutil

    from neo_jax.lm_eval import NeoJaxLM
    from tests.conftest import TOKENIZER_DIR

    directory = shutil.copytree(checkpoint, tmp_path / "model")
    transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    sharded = NeoJaxLM(str(directory), mesh="2.2.2", batch_size=4)
    single = NeoJaxLM(str(directory), batch_size=4)
    assert sharding.model_mesh(sharded.model).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    rng = np.random.default_rng(5)
    requests = [
        (("", ""), rng.integers(0, SMALL["vocab_size"], n).tolist(), rng.integers(0, SMALL["vocab_size"], m).tolist())
        for n, m in ((3, 1), (40, 5), (250, 20), (1, 1), (12, 3))
    ]
    for (a, greedy_a), (b, greedy_b) in zip(
        sharded._loglikelihood_tokens(requests, disable_tqdm=True),
        single._loglikelihood_tokens(requests, disable_tqdm=True),
    ):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4) and greedy_a == greedy_b


# A model whose activations dominate its train step: what the memory test is about.
WIDE_ACTIVATIONS = dict(
    vocab_size=1024,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    attention_types=((("global", "local"), 1),),
    window_size=32,
    max_position_embeddings=512,
)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_train_step_activations_are_split_by_batch(shape):
    """Compiled only: per-device temporaries of the train step for a global batch of 8 stay within 1.25x of
    one device's for its share of the batch (8 / data x fsdp rows). Without activation constraints XLA follows
    the parameters' fsdp split and a (1, 8, 1) mesh needs 8.7x."""
    from neo_jax import aot

    config = neo_jax.GPTNeoConfig(**WIDE_ACTIVATIONS)

    def temporaries(mesh, batch):
        lowered = aot.train_program(config, mesh, batch=batch, seq=512, dtype=jnp.float32)
        return aot.analyse(lowered)["temporaries"]

    rows = 8 // (shape[0] * shape[1])
    sharded = temporaries(sharding.make_mesh(*shape), 8)
    one = temporaries(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), rows)
    assert sharded <= 1.25 * one, (shape, sharded / 2**20, one / 2**20)
    assert one > 16 * 2**20  # activations, not parameters, are what is measured (the parameters are < 2 MiB)


@pytest.fixture(scope="module")
def one_device_step(single):
    """The serving engine's step compiled for one device: its memory analysis."""
    from neo_jax.serve.engine import Engine

    return Engine(single, max_batch=4, max_len=64)._program("step").memory_analysis()


@pytest.mark.parametrize("shape, draft", [((4, 1, 2), "itself"), ((2, 2, 2), "ngram")])
def test_serving_engine_on_a_mesh_equals_one_device(checkpoint, single, one_device_step, shape, draft):
    """Speculating too (the model drafting for itself, or n-gram), rounds mixed with plain steps."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    from neo_jax.serve.engine import Engine

    model = neo_jax.from_pretrained(checkpoint, mesh=sharding.make_mesh(*shape), progress=False)
    drafting = model if draft == "itself" else draft
    engine = Engine(model, max_batch=4, max_len=64, eos_token_id=None, draft=drafting, num_draft_tokens=3)
    kinds = itertools.cycle((True, True, False))
    engine.switch.speculate = lambda: next(kinds)
    engine.start()
    try:
        rng = np.random.default_rng(2)
        prompts = [rng.integers(1, SMALL["vocab_size"], n).tolist() for n in (3, 12, 20, 7, 30, 1)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: engine.generate(p, 16, temperature=0), prompts))
        for prompt, (tokens, _) in zip(prompts, results, strict=True):
            alone = neo_jax.generate(single, np.array(prompt), max_new_tokens=16)[0, len(prompt) :]
            np.testing.assert_array_equal(tokens, alone)
        # Memory: each device holds only its slots' rows and its heads of the cache.
        keys = engine._slots.cache.keys[0]
        data, fsdp, tensor = shape
        expected = (4 // (data * fsdp), SMALL["num_heads"] // tensor, *keys.shape[2:])
        assert keys.sharding.shard_shape(keys.shape) == expected
        if draft == "itself":  # the draft's cache is split as the model's
            assert engine._draft_cache.keys[0].sharding.shard_shape(keys.shape) == expected
        # ... and the compiled step's inputs (weights, cache) per device are well under one device's whole.
        ours, alone = engine._program("step").memory_analysis(), one_device_step
        assert ours.argument_size_in_bytes < 0.5 * alone.argument_size_in_bytes
        if fsdp == 1:  # (fsdp gathers each layer's weights for the step, as in any FSDP forward)
            assert ours.temp_size_in_bytes <= alone.temp_size_in_bytes
    finally:
        engine.stop()


def two_lora_steps(checkpoint, mesh):
    """Two AdamW steps of rank-4 adapters on q, v and c_fc with dropout: the losses, the adapters after them
    and the model."""
    from neo_jax import lora

    ids = np.random.default_rng(4).integers(0, SMALL["vocab_size"], (8, 32)).astype(np.int32)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)
    lora.add(model, lora.LoRAConfig(r=4, dropout=0.2, targets=("q_proj", "v_proj", "c_fc")), seed=1)
    for period in model.periods:  # B away from zero, so that A gets a gradient too
        for dense in (period.attn.q_proj, period.attn.v_proj, period.mlp.c_fc):
            b = dense.lora.b
            b.set_value(jax.device_put(jnp.full(b.shape, 0.01, jnp.float32), b.get_value().sharding))
    optimizer = make_optimizer(model, learning_rate=1e-3)
    batch = ids if mesh is None else jax.device_put(ids, sharding.batch_sharding(mesh, ids.shape))
    losses = [float(train_step(model, optimizer, batch, rng=jax.random.key(i))["loss"]) for i in range(2)]
    adapters = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, lora.LoRAParam))}
    return losses, adapters, model


@pytest.fixture(scope="module")
def single_lora(checkpoint):
    return two_lora_steps(checkpoint, None)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_lora_steps_on_a_mesh_equal_one_device_and_split_the_adapters(checkpoint, single_lora, shape):
    """With dropout: its masks do not depend on how the activations are split."""
    single_losses, single_adapters, _ = single_lora
    mesh_losses, mesh_adapters, model = two_lora_steps(checkpoint, sharding.make_mesh(*shape))
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
    for key, value in single_adapters.items():
        np.testing.assert_allclose(mesh_adapters[key], value, atol=2e-4, err_msg=str(key))
    # Memory: c_fc's B rows follow the tensor axis, its A columns the fsdp axis, as the weight they adapt.
    c_fc = model.periods[0].mlp.c_fc.lora
    _, fsdp, tensor = shape
    assert c_fc.b.get_value().sharding.shard_shape(c_fc.b.shape)[1] == SMALL["hidden_size"] * 4 // tensor
    assert c_fc.a.get_value().sharding.shard_shape(c_fc.a.shape)[2] == SMALL["hidden_size"] // fsdp


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_int8_weights_on_a_mesh_equal_one_device_and_stay_split(checkpoint, shape):
    """Quantizing on a mesh gives one device's int8 values and logits, with the int8 arrays in the float
    weights' shards and the scales split along the output axis."""
    mesh = sharding.make_mesh(*shape)
    alone = neo_jax.from_pretrained(checkpoint, weights="int8", progress=False)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, weights="int8", progress=False)
    ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (8, 24)).astype(np.int32)
    placed = jax.device_put(ids, sharding.batch_sharding(mesh, ids.shape))
    np.testing.assert_allclose(np.asarray(model(placed)), np.asarray(alone(ids)), atol=1e-5, rtol=0)
    c_fc = model.periods[0].mlp.c_fc
    np.testing.assert_array_equal(np.asarray(c_fc.kernel[...]), np.asarray(alone.periods[0].mlp.c_fc.kernel[...]))
    _, fsdp, tensor = shape
    assert c_fc.kernel.dtype == jnp.int8
    assert c_fc.kernel.get_value().sharding.shard_shape(c_fc.kernel.shape)[1:] == (
        SMALL["hidden_size"] * 4 // tensor,
        SMALL["hidden_size"] // fsdp,
    )
    assert c_fc.scale.get_value().sharding.shard_shape(c_fc.scale.shape)[1] == SMALL["hidden_size"] * 4 // tensor
