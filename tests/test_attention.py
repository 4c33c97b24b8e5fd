"""The attention implementations against transformers' PyTorch GPT-Neo and against each other: values,
padding, gradients, generation, and (compiled, nothing run) memory and FLOPs."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import neo_jax
from neo_jax import attention
from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo
from neo_jax.train import token_losses
from tests.conftest import SMALL, hf_logits, make_hf_model, random_ids

RUNNABLE = ["dense", "blockwise", "splash"]  # here, on the CPU (splash in Pallas' interpret mode); cuDNN: GPUs


def runs_here(implementation: str):
    """The context in which ``implementation`` runs on this CPU: Pallas' interpreter for splash."""
    return attention.splash_interpret() if implementation == "splash" else contextlib.nullcontext()


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """SMALL with window 40 (wider than some blocks below) and every parameter random."""
    model = make_hf_model(seed=3, window_size=40)
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("implementation", RUNNABLE)
@pytest.mark.parametrize("length", [1, 2, 17, 39, 40, 41, 81, 127, 128, 129, 200, 256])
def test_logits_match_transformers(reference_dir, implementation, length):
    """Lengths from 1 to past twice the window (40), odd ones, and ones that are not multiples of the block."""
    reference, directory = reference_dir
    with runs_here(implementation):
        model = neo_jax.from_pretrained(directory, attention=implementation, progress=False)
        ids = random_ids(2, length, SMALL["vocab_size"], seed=length)
        np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("block", [8, 16, 128])
@pytest.mark.parametrize("length", [5, 40, 57, 200])
def test_blockwise_and_splash_equal_dense_whatever_the_block(block, length):
    """Blocks smaller and larger than the window (40), including a left-padded row: every real query's output
    equals dense attention's (splash's blocks are its own, a multiple of 128)."""
    rng = np.random.default_rng(length + block)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, length, 8)) * 2, jnp.float32) for _ in range(3))
    mask = np.ones((2, length), np.int32)
    mask[1, : length // 3] = 0
    masks = attention.masks(length, length, 40)
    bias = attention.padding_bias(masks["global"], jnp.asarray(mask))
    for kind in ("global", "local"):
        dense = np.asarray(attention.dense(q, k, v, masks[kind], bias))
        blockwise = np.asarray(attention.blockwise(q, k, v, kind, 40, jnp.asarray(mask), block=block))
        real = mask.astype(bool)
        np.testing.assert_allclose(blockwise.transpose(0, 2, 1, 3)[real], dense.transpose(0, 2, 1, 3)[real], atol=1e-4)
        if block == 128:
            with attention.splash_interpret():
                splash = np.asarray(attention.splash(q, k, v, kind, 40, jnp.asarray(mask)))
            np.testing.assert_allclose(splash.transpose(0, 2, 1, 3)[real], dense.transpose(0, 2, 1, 3)[real], atol=1e-4)


@pytest.mark.parametrize("implementation", RUNNABLE)
def test_left_padded_batch_matches_transformers(reference_dir, implementation):
    reference, directory = reference_dir
    ids = random_ids(3, 150, SMALL["vocab_size"], seed=7)
    mask = np.ones_like(ids)
    mask[1, :60] = 0
    mask[2, :135] = 0
    with runs_here(implementation):
        model = neo_jax.from_pretrained(directory, attention=implementation, progress=False)
        ours, theirs = np.asarray(model(ids, attention_mask=mask)), hf_logits(reference, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_gradients_equal_dense(reference_dir):
    _, directory = reference_dir
    ids = jnp.asarray(random_ids(2, 150, SMALL["vocab_size"], seed=11))
    grads = {}
    for implementation in RUNNABLE:
        with runs_here(implementation):
            model = neo_jax.from_pretrained(directory, attention=implementation, progress=False)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            loss = lambda p, graphdef=graphdef, rest=rest: token_losses(nnx.merge(graphdef, p, rest), ids)[0]
            grads[implementation] = jax.tree.leaves(jax.grad(loss)(params))
    for implementation in ("blockwise", "splash"):
        for dense, other in zip(grads["dense"], grads[implementation], strict=True):
            scale = float(jnp.abs(dense).max())
            np.testing.assert_allclose(np.asarray(other), np.asarray(dense), atol=1e-4 * scale + 1e-7, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["blockwise", "splash"])
def test_greedy_generation_is_token_identical(reference_dir, implementation):
    """Prefill through blockwise or splash attention (a 150-token left-padded prompt), decode through the
    cache."""
    reference, directory = reference_dir
    ids = random_ids(2, 150, SMALL["vocab_size"], seed=5)
    mask = np.ones_like(ids)
    mask[0, :20] = 0
    with runs_here(implementation):
        model = neo_jax.from_pretrained(directory, attention=implementation, progress=False)
        ours = neo_jax.generate(model, ids, mask, max_new_tokens=40)
    with torch.no_grad():
        theirs = reference.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_auto_chooses_by_platform_and_length():
    assert attention.choose("auto", 512, jnp.float32) == "dense"
    assert attention.choose("auto", 2048, jnp.bfloat16) == "blockwise"  # no GPU here
    assert attention.choose("blockwise", 16, jnp.float32) == "blockwise"
    assert attention.choose("auto", 16, jnp.float32, on="tpu") == "splash"
    assert attention.choose("auto", 16, jnp.bfloat16, on="gpu") == "cudnn"
    assert attention.choose("auto", 16, jnp.float32, on="gpu") == "dense"
    with attention.compiling_for("tpu"):
        assert attention.choose("auto", 16, jnp.float32) == "splash" and "splash" in attention.available()
    assert attention.platform() == "cpu" and "splash" not in attention.available()


@pytest.mark.parametrize(
    "name, message",
    [
        ("cudnn", "cannot run on the cpu backend; available here: auto, dense, blockwise"),
        ("splash", "cannot run on the cpu backend; available here: auto, dense, blockwise"),
        ("flash", "unknown"),
    ],
)
def test_an_implementation_the_backend_cannot_run_is_refused(reference_dir, name, message, capsys):
    _, directory = reference_dir
    with pytest.raises(ValueError, match=message):
        neo_jax.from_pretrained(directory, attention=name, progress=False)
    from neo_jax.cli import main

    argv = ["generate", "--model", str(directory), "--prompt", "x", "--attention", name]
    assert main(argv) == 2
    assert message.split(";")[0] in capsys.readouterr().err


# ----------------------------------------------------------------------- compiled memory and FLOPs
def loss_and_grad_temporaries(implementation: str, seq: int) -> int:
    config = GPTNeoConfig.preset("125M")
    model = nnx.eval_shape(lambda: GPTNeo(config, attention=implementation, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, ids: token_losses(nnx.merge(graphdef, p, rest), ids)[0]
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    return jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_memory_is_linear_in_length():
    """125M, batch 1, float32, no remat, loss + gradient on XLA:CPU: dense needs 8.08 GiB of temporaries at
    2048 tokens (2.88x its 1024-token figure); blockwise at most 3.6 GiB, and at most 2.15x."""
    at_1024, at_2048 = (loss_and_grad_temporaries("blockwise", n) for n in (1024, 2048))
    assert at_2048 <= 3.6 * 2**30, at_2048 / 2**30
    assert at_2048 <= 2.15 * at_1024, at_2048 / at_1024


def test_a_local_layer_costs_a_quarter_of_dense_flops():
    """XLA's compiled cost analysis of one local layer's attention at T = 2048, window 256 (the block loop
    unrolled, since the cost analysis counts a loop body once)."""
    t, window = 2048, 256
    q = jax.ShapeDtypeStruct((1, 12, t, 64), jnp.float32)

    def flops(f):
        return jax.jit(f).lower(q, q, q).compile().cost_analysis()["flops"]

    dense = flops(lambda q, k, v: attention.dense(q, k, v, attention.masks(t, t, window)["local"]))
    local = flops(lambda q, k, v: attention.blockwise(q, k, v, "local", window, unroll=True))
    assert local <= 0.25 * dense, local / dense
