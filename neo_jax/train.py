"""Training: next-token loss, the AdamW optimizer with its schedule, and one jitted train step.

The fine-tuning loop, data pipeline and checkpoints build on these.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from neo_jax.evaluate import token_logprobs
from neo_jax.lora import has_dropout, has_lora, trainable, with_dropout
from neo_jax.model import GPTNeo
from neo_jax.quantize import is_quantized
from neo_jax.settings import OptimizerConfig
from neo_jax.sharding import model_mesh, use_mesh


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    if config.total_steps <= config.warmup_steps:
        after = optax.constant_schedule(config.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            config.learning_rate,
            config.total_steps - config.warmup_steps,
            alpha=config.final_learning_rate / config.learning_rate if config.learning_rate else 0.0,
        )
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for the parameters weight decay applies to: Linear kernels and LoRA adapters, and embeddings if
    asked."""

    def decays(path, _):
        names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
        return "kernel" in names or "lora" in names or (decay_embeddings and "embedding" in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(model: GPTNeo, config: OptimizerConfig | None = None, **options) -> nnx.Optimizer:
    """The optimizer for ``model``'s trainable parameters (``trainable``); its state is created alongside them
    (so on a mesh it is sharded like them). ``options`` override fields of ``config``."""
    if is_quantized(model) and not has_lora(model):
        raise ValueError(
            "int8 weights do not train: train a model loaded with float weights, or LoRA adapters on the int8 base"
        )
    config = dataclasses.replace(config or OptimizerConfig(), **options)
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=partial(weight_decay_mask, decay_embeddings=config.decay_embeddings),
    )
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0 else optax.identity()
    return nnx.Optimizer(model, optax.chain(clip, adamw), wrt=trainable(model))


def token_losses(model: GPTNeo, input_ids, loss_mask=None, *, remat: str = "none"):
    """(sum of next-token cross entropies in float32, number of target tokens) for one batch.

    ``loss_mask`` ([batch, seq], 1 = a real token) leaves padding out as a target; ``remat`` as in
    ``GPTNeo.hidden_states``.
    """
    logits = model.logits(model.hidden_states(input_ids, remat=remat)[:, :-1])  # no logits for the last position
    losses = -token_logprobs(logits, input_ids[:, 1:])
    weights = jnp.ones_like(losses) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    return (losses * weights).sum(), weights.sum()


def head_losses(model: GPTNeo, input_ids, attention_mask, labels, *, remat: str = "none"):
    """(sum of the task head's losses in float32, number of labelled examples or tokens) for one batch: cross
    entropy for a classifier (labels -100 are left out), squared error for a one-output (regression) head."""
    hidden = model.hidden_states(input_ids, attention_mask, remat=remat)
    logits = model.head_outputs(hidden, input_ids).astype(jnp.float32)  # [batch, labels] or [batch, seq, labels]
    if logits.shape[-1] == 1:
        return ((logits[..., 0] - labels) ** 2).sum(), jnp.float32(labels.size)
    keep = labels != -100
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    losses = -jnp.take_along_axis(log_probs, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(keep, losses, 0.0).sum(), keep.sum().astype(jnp.float32)


def next_token_loss(model: GPTNeo, input_ids, loss_mask=None, *, remat: str = "none"):
    """Mean next-token cross entropy over the batch's target tokens."""
    total, count = token_losses(model, input_ids, loss_mask, remat=remat)
    return total / jnp.maximum(count, 1.0)


def train_step(
    model: GPTNeo,
    optimizer: nnx.Optimizer,
    input_ids,
    loss_mask=None,
    *,
    grad_accum: int = 1,
    remat: str = "none",
    rng=None,
    labels=None,
):
    """One optimizer step on a batch, in place; returns ``{"loss", "grad_norm"}``.

    With ``labels`` the loss is the task head's (``head_losses``) and ``loss_mask`` is the batch's attention mask
    (its padding); without, it is the next-token loss of a causal LM.

    With ``grad_accum > 1`` the batch is cut into that many micro-batches whose gradients are summed in a
    scan before the single update: the same step as the whole batch at once, in less activation memory.
    The loss is the mean over every target token of the batch either way. ``remat`` ("none", "full",
    "dots") trades compute for activation memory (``neo_jax.model.REMAT_POLICIES``). On a mesh the activations
    are split like the batch (see ``neo_jax.sharding``).

    LoRA adapters with dropout (``neo_jax.lora``) need ``rng``, a ``jax.random.key`` for this step (e.g. the
    run's key folded with the step number, so that a resumed run draws the same masks); each micro-batch
    and layer draws its own mask from it. Without dropout ``rng`` is not used.
    """
    if loss_mask is None:
        loss_mask = jnp.ones_like(input_ids)
    if not has_dropout(model):
        rng = None
    elif rng is None:
        raise ValueError("this model's LoRA adapters use dropout: pass rng=jax.random.key(...) for the step's masks")
    with use_mesh(model_mesh(model)):
        return compiled_train_step(
            model, optimizer, input_ids, loss_mask, rng, labels, grad_accum=grad_accum, remat=remat
        )


@partial(nnx.jit, static_argnames=("grad_accum", "remat"), donate_argnames=("model", "optimizer"))
def compiled_train_step(
    model: GPTNeo,
    optimizer: nnx.Optimizer,
    input_ids,
    loss_mask,
    rng=None,
    labels=None,
    *,
    grad_accum: int,
    remat: str = "none",
):
    """``train_step``'s program; the caller enters the model's mesh (``neo_jax.aot`` lowers it for a TPU)."""
    graphdef, params, rest = nnx.split(model, trainable(model), ...)  # gradients for what trains only

    def summed(params, rest, ids, mask, rng, labels):
        # copy=True: fresh Variables at this trace level for what does not train (frozen LoRA bases) too
        model = nnx.merge(graphdef, params, rest, copy=True)
        if rng is not None:
            with_dropout(model, rng)
        if labels is not None:
            return head_losses(model, ids, mask, labels, remat=remat)
        return token_losses(model, ids, mask, remat=remat)

    grad_fn = jax.value_and_grad(summed, has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(params, rest, input_ids, loss_mask, rng, labels)
    else:
        if input_ids.shape[0] % grad_accum:
            raise ValueError(f"batch {input_ids.shape[0]} does not split into {grad_accum} micro-batches")
        # micro-batch k is rows k, k + grad_accum, ...: every device holds its share of each (contiguous rows
        # would put a micro-batch on a fraction of the devices, replicated there)
        micro = lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        rngs = None if rng is None else jax.random.split(rng, grad_accum)

        def accumulate(carry, batch):
            (total, count), grads = grad_fn(params, rest, *batch)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
        batches = (micro(input_ids), micro(loss_mask), rngs, None if labels is None else micro(labels))
        (total, count, grads), _ = jax.lax.scan(accumulate, zeros, batches)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    optimizer.update(model, grads)
    return {"loss": total / count, "grad_norm": optax.tree.norm(grads)}


_batch_losses = nnx.jit(token_losses)


def mean_loss(model: GPTNeo, batches) -> float:
    """Mean next-token cross entropy over every target token of ``batches`` (``[batch, seq]`` arrays)."""
    total = count = 0.0
    for input_ids in batches:
        with use_mesh(model_mesh(model)):
            batch_total, batch_count = _batch_losses(model, input_ids)
        total, count = total + float(batch_total), count + float(batch_count)
    if not count:
        raise ValueError("nothing to evaluate: no batch with a target token")
    return total / count
