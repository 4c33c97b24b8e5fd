"""The KV cache, the prefill that fills it, the single-token decode step that reads and extends it, and
``extend``, which runs several tokens per row into it at once (speculative decoding's verification).

The cache holds keys and values per layer in ring buffers indexed by ``slot % length``: global layers keep
every slot (length = the whole sequence), local layers only their last ``window_size`` slots (plus
``lookahead`` more when tokens are written ahead of the ones kept).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from neo_jax import sharding
from neo_jax.attention import dense, self_attention
from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer.

    ``keys[i]`` / ``values[i]`` are layer ``i``'s ``[batch, heads, length, head_dim]`` ring buffers, with
    ``length = max_len`` for global layers and ``min(window_size, max_len)`` for local ones; sequence slot
    ``s`` lives at ``s % length``. ``valid[b, s]`` says whether slot ``s`` holds a real token (not left
    padding); ``index`` is the slot of the next token: one for every row, or ``[batch]`` (one per row) in the
    server's slots.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


def cache_lengths(config: GPTNeoConfig, max_len: int, lookahead: int = 0) -> tuple[int, ...]:
    """Ring-buffer length of each layer: a local layer's holds ``window_size + lookahead`` slots (at most
    ``max_len``), so that writing up to ``lookahead`` tokens past those its queries see overwrites none of
    them."""
    local = min(config.window_size + lookahead, max_len)
    return tuple(max_len if kind == "global" else local for kind in config.attention_layers)


def cache_bytes(config: GPTNeoConfig, batch: int, max_len: int, dtype=jnp.float32) -> int:
    """Bytes of the KV cache for ``batch`` sequences of ``max_len`` slots."""
    return 2 * batch * config.hidden_size * jnp.dtype(dtype).itemsize * sum(cache_lengths(config, max_len))


def init_cache(config: GPTNeoConfig, batch: int, max_len: int, dtype, lookahead: int = 0) -> KVCache:
    """An empty cache (``lookahead``: see ``cache_lengths``); under a mesh (``sharding.use_mesh``) it is split
    by batch and heads, like the activations that fill it."""

    def zeros(shape, names, dtype):
        return sharding.constrain(jnp.zeros(shape, dtype), *names)

    def layer(length):
        return zeros((batch, config.num_heads, length, config.head_dim), ("batch", "heads", None, None), dtype)

    lengths = cache_lengths(config, max_len, lookahead)
    return KVCache(
        keys=tuple(layer(n) for n in lengths),
        values=tuple(layer(n) for n in lengths),
        valid=zeros((batch, max_len), ("batch", None), bool),
        index=jnp.int32(0),
    )


def _set(items: tuple, i: int, value) -> tuple:
    return (*items[:i], value, *items[i + 1 :])


def _write_prompt(cache: KVCache, layer: int, k, v) -> KVCache:
    """Store the keys/values of slots ``0..t-1`` (the whole prompt); a ring keeps only its last ``length``."""
    length, t = cache.keys[layer].shape[2], k.shape[2]
    ring = jnp.arange(max(t - length, 0), t) % length
    keys = cache.keys[layer].at[:, :, ring].set(k[:, :, t - len(ring) :].astype(cache.keys[layer].dtype))
    values = cache.values[layer].at[:, :, ring].set(v[:, :, t - len(ring) :].astype(cache.values[layer].dtype))
    return dataclasses.replace(cache, keys=_set(cache.keys, layer, keys), values=_set(cache.values, layer, values))


def _write_token(cache: KVCache, layer: int, k, v) -> KVCache:
    """Store one token's key/value per row at slot ``cache.index`` (one slot for all rows, or one per row)."""
    length = cache.keys[layer].shape[2]
    if cache.index.ndim == 0:  # every row at the same slot: an in-place slice update
        at = (0, 0, cache.index % length, 0)
        write = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), at)
    else:  # each row at its own slot (the server's slots)
        rows, ring = jnp.arange(k.shape[0]), cache.index % length
        write = lambda buffer, new: buffer.at[rows, :, ring].set(new[:, :, 0].astype(buffer.dtype))
    keys, values = write(cache.keys[layer], k), write(cache.values[layer], v)
    return dataclasses.replace(cache, keys=_set(cache.keys, layer, keys), values=_set(cache.values, layer, values))


def _visible(cache: KVCache, length: int, window: int | None):
    """``[batch, 1, 1, length]``: the ring entries the token at slot ``cache.index`` may attend to — real
    tokens, and for a local layer only the last ``window`` slots (a ring of ``window`` entries holds
    nothing older anyway). Ring entry r holds the latest slot s <= index with s % length == r."""
    index = jnp.reshape(cache.index, (-1, 1))  # [1, 1], or [batch, 1] when each row has its own slot
    slots = index - (index - jnp.arange(length)) % length
    visible = slots >= 0 if window is None else (slots >= 0) & (slots > index - window)
    slots = jnp.broadcast_to(jnp.maximum(slots, 0), (cache.valid.shape[0], length))
    return (visible & jnp.take_along_axis(cache.valid, slots, axis=1))[:, None, None, :]


def prefill(model: GPTNeo, periods, input_ids, attention_mask, max_len: int, lookahead: int = 0):
    """Run the whole (left-padded) prompt into a new cache of ``max_len`` slots; return the last position's
    logits [batch, vocab], the cache, and every position's final hidden state (unused values cost nothing in a
    jitted caller: XLA drops them).
    Positions count real tokens only (padding gets 0), as transformers' ``generate`` derives them from the
    attention mask."""
    seq_len = input_ids.shape[1]
    position_ids = jnp.where(attention_mask == 1, jnp.cumsum(attention_mask, axis=1) - 1, 0)
    cache = init_cache(model.config, input_ids.shape[0], max_len, model.dtype, lookahead)
    window = model.config.window_size

    def attention(layer, kind, q, k, v, cache):
        out = self_attention(q, k, v, kind, window, attention_mask, model.attention)
        return out, _write_prompt(cache, layer, k, v)

    cache = dataclasses.replace(cache, valid=cache.valid.at[:, :seq_len].set(attention_mask.astype(bool)))
    hidden, cache = model.transform(input_ids, position_ids, attention, cache, periods)
    cache = dataclasses.replace(cache, index=jnp.int32(seq_len))
    logits = model.logits(hidden[:, -1:])[:, 0]
    return logits, cache, hidden


def decode_step(model: GPTNeo, periods, tokens, positions, cache: KVCache):
    """One token per row at slot ``cache.index`` (a scalar, or one slot per row): logits [batch, vocab] and
    the updated cache."""
    rows = jnp.arange(tokens.shape[0])
    cache = dataclasses.replace(cache, valid=cache.valid.at[rows, cache.index].set(True))
    lengths = dict(zip(model.config.attention_layers, (key.shape[2] for key in cache.keys)))
    windows = {"global": None, "local": model.config.window_size}
    masks = {kind: _visible(cache, length, windows[kind]) for kind, length in lengths.items()}  # once per step

    def attention(layer, kind, q, k, v, cache):
        cache = _write_token(cache, layer, k, v)
        return dense(q, cache.keys[layer], cache.values[layer], masks[kind]), cache

    hidden, cache = model.transform(tokens[:, None], positions[:, None], attention, cache, periods)
    cache = dataclasses.replace(cache, index=cache.index + 1)
    return model.logits(hidden)[:, 0], cache


def extend(model: GPTNeo, periods, tokens, positions, cache: KVCache, write=None):
    """``T`` tokens per row (``[batch, T]``, position ids ``positions + 0..T-1``, at most the model's last) at
    slots ``cache.index + 0..T-1`` (one index per row, ``[batch]``): logits ``[batch, T, vocab]`` and the cache
    with them written, its index unchanged (the caller moves it past the tokens it keeps). Each token sees its
    row's earlier slots that its layer keeps and the earlier tokens among these. A local layer's ring must hold
    ``window + T`` slots (``lookahead``), so that the writes overwrite nothing a query still sees; slots written
    past the index are seen by no later query until they are written again. ``write`` (``[batch, T]`` bool):
    only these tokens are written (a row's first ones; the others' outputs mean nothing)."""
    batch, t = tokens.shape
    rows = jnp.arange(batch)[:, None]
    slots = cache.index[:, None] + jnp.arange(t)  # [batch, T]
    written = rows if write is None else jnp.where(write, rows, batch)  # out of range: dropped
    cache = dataclasses.replace(cache, valid=cache.valid.at[written, slots].set(True, mode="drop"))
    lengths = dict(zip(model.config.attention_layers, (key.shape[2] for key in cache.keys)))
    windows = {"global": None, "local": model.config.window_size}

    def visible(length: int, window: int | None):  # [batch, 1, T, length]
        held = ring_slots(cache.index[:, None] + t, length)[:, None, :]  # the slot each entry holds, once written
        query = slots[:, :, None]
        seen = (held >= 0) & (held <= query) & (True if window is None else held > query - window)
        real = jnp.take_along_axis(cache.valid, jnp.maximum(held[:, 0], 0), axis=1)[:, None, :]
        return (seen & real)[:, None]

    masks = {kind: visible(length, windows[kind]) for kind, length in lengths.items()}

    def attention(layer, kind, q, k, v, cache):
        ring = slots % cache.keys[layer].shape[2]
        put = lambda buffer, new: buffer.at[written, :, ring].set(
            new.transpose(0, 2, 1, 3).astype(buffer.dtype), mode="drop"
        )
        keys, values = put(cache.keys[layer], k), put(cache.values[layer], v)
        cache = dataclasses.replace(cache, keys=_set(cache.keys, layer, keys), values=_set(cache.values, layer, values))
        return dense(q, keys, values, masks[kind]), cache

    position_ids = jnp.minimum(positions[:, None] + jnp.arange(t), model.config.max_position_embeddings - 1)
    hidden, cache = model.transform(tokens, position_ids, attention, cache, periods)
    return model.logits(hidden), cache


def ring_slots(end, length: int):
    """``[..., length]``: the sequence slot ring entry r holds once slots ``0..end-1`` are written (the latest
    ``s < end`` with ``s % length == r``; negative: none). ``end`` broadcasts against ``[..., 1]``."""
    r = jnp.arange(length)
    return end - 1 - (end - 1 - r) % length


def cache_bucket(n: int) -> int:
    """Round a cache length up to a multiple of 64: decode steps read the whole global cache, so a finer
    rounding than ``bucket`` pays for the rare extra compilation."""
    return 64 * math.ceil(n / 64)
