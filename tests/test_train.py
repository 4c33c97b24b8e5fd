"""The train step against PyTorch: same weights, same batches, AdamW with warmup + cosine, clipping and
weight decay on the weight matrices only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import neo_jax
from neo_jax.train import OptimizerConfig, learning_rate_schedule, make_optimizer, next_token_loss, train_step
from tests.conftest import SMALL, make_hf_model

CONFIG = OptimizerConfig(
    learning_rate=3e-3, warmup_steps=2, total_steps=5, final_learning_rate=3e-4, weight_decay=0.1, max_grad_norm=1.0
)


def batches(n=5, batch=4, seq=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, SMALL["vocab_size"], (batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, -7:] = 0  # right padding: not a target
        out.append((ids, mask))
    return out


def torch_losses(hf, data, config: OptimizerConfig):
    decay = [p for n, p in hf.named_parameters() if n.endswith(".weight") and (".attn." in n or ".mlp." in n)]
    rest = [p for n, p in hf.named_parameters() if not any(p is q for q in decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(config.b1, config.b2),
        eps=config.eps,
    )
    schedule = learning_rate_schedule(config)
    lr_lambda = lambda step: float(schedule(step)) / config.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    losses = []
    hf.train()
    for ids, mask in data:
        labels = torch.as_tensor(np.where(mask == 1, ids, -100))
        loss = hf(torch.as_tensor(ids), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_five_adamw_steps_match_pytorch(save_hf):
    hf = make_hf_model()
    directory = save_hf(hf)
    model = neo_jax.from_pretrained(directory, progress=False)
    data = batches()
    optimizer = make_optimizer(model, CONFIG)
    ours = [float(train_step(model, optimizer, jnp.asarray(i, jnp.int32), jnp.asarray(m))["loss"]) for i, m in data]
    reference = torch_losses(hf, data, CONFIG)
    np.testing.assert_allclose(ours, reference, rtol=1e-4)
    # the steps really moved the weights: the last batch's loss at the initial weights differs
    untouched = neo_jax.from_pretrained(directory, progress=False)
    ids, mask = data[-1]
    assert abs(float(next_token_loss(untouched, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))) - ours[-1]) > 1e-2


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_gradient_accumulation_is_the_same_step(save_hf):
    directory = save_hf(make_hf_model())
    ids, mask = batches(n=1, batch=8)[0]
    results = []
    for accum in (1, 4):
        model = neo_jax.from_pretrained(directory, progress=False)
        metrics = train_step(
            model, make_optimizer(model, CONFIG), jnp.asarray(ids, jnp.int32), jnp.asarray(mask), grad_accum=accum
        )
        results.append((metrics, params(model)))
    (one, p1), (four, p4) = results
    np.testing.assert_allclose(float(four["loss"]), float(one["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(four["grad_norm"]), float(one["grad_norm"]), rtol=1e-5)
    for a, b in zip(p1, p4):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_weight_decay_skips_biases_layernorms_and_embeddings(save_hf):
    model = neo_jax.from_pretrained(save_hf(make_hf_model()), progress=False)
    before = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    # a zero learning rate for Adam's update leaves only... nothing: so use a huge decay with a tiny rate
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=100.0)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero_grads)  # Adam's step is 0/(0+eps) = 0: only weight decay moves anything
    after = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    for key, value in before.items():
        decayed = "kernel" in key
        np.testing.assert_allclose(after[key], value * (1 - 0.1) if decayed else value, rtol=1e-6, err_msg=key)


def test_bfloat16_compute_keeps_float32_master_weights(save_hf):
    model = neo_jax.from_pretrained(save_hf(make_hf_model()), dtype="bfloat16", progress=False)
    ids, mask = batches(n=1)[0]
    metrics = train_step(model, make_optimizer(model, CONFIG), jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert np.isfinite(float(metrics["loss"]))
    assert {p.dtype for p in params(model)} == {jnp.dtype(jnp.float32)}


def test_remat_policies_give_the_same_gradients(save_hf):
    model = neo_jax.from_pretrained(save_hf(make_hf_model()), progress=False)
    ids, mask = (jnp.asarray(x) for x in batches(n=1)[0])
    grads, jaxprs = {}, {}
    for policy in ("none", "full", "dots"):
        graphdef, state = nnx.split(model)
        loss = lambda s, g=graphdef, p=policy: next_token_loss(nnx.merge(g, s), ids.astype(jnp.int32), mask, remat=p)
        grads[policy] = jax.tree.leaves(jax.grad(loss)(state))
        jaxprs[policy] = str(jax.make_jaxpr(jax.grad(loss))(state))
    for policy in ("full", "dots"):
        assert "remat" in jaxprs[policy] and "remat" not in jaxprs["none"]
        for a, b in zip(grads["none"], grads[policy]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def run(directory, data, steps, *, start=0, checkpoints=None):
    """Train from the weights in ``directory`` over batches ``start..steps-1`` (resuming if a checkpoint
    exists); returns the per-step losses and the final parameters."""
    model = neo_jax.from_pretrained(directory, progress=False)
    optimizer = make_optimizer(model, CONFIG)
    if checkpoints is not None and checkpoints.latest_step() is not None:
        start = checkpoints.restore(model, optimizer)
    losses = []
    for step in range(start, steps):
        losses.append(float(train_step(model, optimizer, jnp.asarray(data[step]))["loss"]))
        if checkpoints is not None:
            checkpoints.save(step + 1, model, optimizer)
    if checkpoints is not None:
        checkpoints.wait()
    return losses, params(model)


def test_exact_resume(save_hf, tmp_path):
    from neo_jax.checkpoints import Checkpoints

    directory = save_hf(make_hf_model())
    data = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (12, 4, 16)).astype(np.int32)  # step's batch
    straight, final = run(directory, data, 12)

    first = Checkpoints(tmp_path / "ckpt", save_every=3, keep=2)
    head, _ = run(directory, data, 6, checkpoints=first)
    first.close()
    assert sorted(first.all_steps()) == [3, 6]  # every 3 steps, the last 2 kept

    # a save cut off mid-write leaves only a temporary directory: it is ignored (and cleaned up)
    (tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1234567").mkdir()
    second = Checkpoints(tmp_path / "ckpt", save_every=3, keep=2)
    assert second.latest_step() == 6
    tail, resumed = run(directory, data, 12, checkpoints=second)
    second.close()
    np.testing.assert_array_equal(head + tail, straight)
    for a, b in zip(final, resumed):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert not list((tmp_path / "ckpt").glob("*tmp*"))


def test_restore_without_checkpoint_is_a_clear_error(save_hf, tmp_path):
    from neo_jax.checkpoints import Checkpoints

    model = neo_jax.from_pretrained(save_hf(make_hf_model()), progress=False)
    checkpoints = Checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoints.restore(model, make_optimizer(model, CONFIG))
