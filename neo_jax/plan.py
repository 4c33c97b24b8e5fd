"""Memory planning: what one device holds when fine-tuning on a mesh, before anything is launched.

Parameters, optimizer state and gradients are counted exactly from the model's shapes and the sharding
rules (one device's shard of every array). Activations are an estimate of what the backward pass keeps,
per layer and token, after Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models", adapted to GPT-Neo (no dropout masks, float32 attention probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo
from neo_jax.sharding import AXES, shard_shape, spec

GIB = 2**30
# Memory per chip of common accelerators, GiB.
DEVICES = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "GPU 80 GB": 80}


def parameter_bytes(config: GPTNeoConfig, mesh: Mapping[str, int], param_dtype=jnp.float32, rules=None) -> int:
    """Bytes of one device's shards of every parameter."""
    abstract = nnx.eval_shape(lambda: GPTNeo(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    total = 0
    for _, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value()
        partition = spec(variable.get_metadata()["out_sharding"], value.shape, mesh, rules)
        total += math.prod(shard_shape(value.shape, partition, mesh)) * value.dtype.itemsize
    return total


def activation_bytes(
    config: GPTNeoConfig, mesh: Mapping[str, int], batch: int, seq: int, *, remat: bool, dtype=jnp.bfloat16
) -> int:
    """Estimated bytes of activations one device keeps for the backward pass."""
    h, inner, heads, layers = config.hidden_size, config.inner_size, config.num_heads, config.num_layers
    e = jnp.dtype(dtype).itemsize
    t = mesh["tensor"]
    t_heads = t if heads % t == 0 else 1
    t_mlp = t if inner % t == 0 else 1
    t_vocab = t if config.vocab_size % t == 0 else 1
    local_batch = batch // (mesh["data"] * mesh["fsdp"])
    # Per token and layer: LayerNorm inputs/outputs and the residual stream (replicated over `tensor`),
    # q, k, v and the attention output (split by heads), the MLP's hidden layer before and after gelu
    # (split by mlp), and the float32 attention probabilities (seq per head).
    per_layer = e * (4 * h + 4 * h / t_heads + 2 * inner / t_mlp) + 4 * heads / t_heads * seq
    if remat:  # only each layer's input is kept; one layer's worth is rebuilt at a time
        per_token = layers * e * h + per_layer
    else:
        per_token = layers * per_layer
    logits = 2 * 4 * config.vocab_size / t_vocab  # float32 logits and their gradient
    return int(local_batch * seq * (per_token + logits))


def plan(
    config: GPTNeoConfig,
    mesh: Mapping[str, int],
    batch: int,
    seq: int,
    *,
    remat: bool = False,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    rules=None,
) -> dict:
    """Per-device bytes of an AdamW fine-tuning step: parameters, optimizer state (two moments),
    gradients and activations, plus their total."""
    mesh = {axis: int(mesh[axis]) for axis in AXES}
    if any(size < 1 for size in mesh.values()):
        raise ValueError(f"mesh sizes must be positive, got {mesh}")
    replicas = mesh["data"] * mesh["fsdp"]
    if batch < 1 or batch % replicas:
        raise ValueError(f"batch {batch} must be a positive multiple of data x fsdp = {replicas}")
    if not 1 <= seq <= config.max_position_embeddings:
        raise ValueError(f"seq {seq} must be in [1, max_position_embeddings={config.max_position_embeddings}]")
    params = parameter_bytes(config, mesh, param_dtype, rules)
    result = {
        "parameters": params,
        "optimizer_state": 2 * params,
        "gradients": params,
        "activations": activation_bytes(config, mesh, batch, seq, remat=remat, dtype=dtype),
    }
    result["total"] = sum(result.values())
    return result


def report(result: dict) -> str:
    """A small table in GiB, and which common devices the total fits on."""
    lines = [f"{name.replace('_', ' '):>16}  {value / GIB:8.2f} GiB" for name, value in result.items()]
    fits = ", ".join(
        f"{device} ({gib} GiB): {'yes' if result['total'] <= gib * GIB else 'no'}" for device, gib in DEVICES.items()
    )
    return "\n".join(["per device:", *lines, f"fits: {fits}"])
