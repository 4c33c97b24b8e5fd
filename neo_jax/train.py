"""Training: next-token loss, the optimizer and one jitted train step.

This is the core the sharding tests run on a mesh; the fine-tuning loop, data pipeline and checkpoints
build on it.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from neo_jax.model import GPTNeo


def next_token_loss(model: GPTNeo, input_ids, loss_mask=None):
    """Mean cross entropy (in float32) of predicting ``input_ids[:, 1:]`` from what precedes each token.

    ``loss_mask`` ([batch, seq], 1 = count this token as a target) leaves padding out of the mean.
    """
    logits = model(input_ids)[:, :-1]
    targets = input_ids[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = jnp.ones_like(losses) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_optimizer(
    model: GPTNeo, learning_rate: float | optax.Schedule = 1e-4, weight_decay: float = 0.0
) -> nnx.Optimizer:
    """AdamW over the model's parameters (state created alongside them, so sharded like them on a mesh)."""
    return nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=nnx.Param)


@nnx.jit
def train_step(model: GPTNeo, optimizer: nnx.Optimizer, input_ids, loss_mask=None):
    """One optimizer step on a batch; updates ``model`` and ``optimizer`` in place and returns the loss."""
    loss, grads = nnx.value_and_grad(next_token_loss)(model, input_ids, loss_mask)
    optimizer.update(model, grads)
    return loss
