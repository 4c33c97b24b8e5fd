"""GPT-Neo's attention, behind one entry point with several implementations.

The numerics are the reference's in every one: logits ``q @ k^T`` with no ``1/sqrt(d)`` scaling, computed
and soft-maxed in float32, masked logits at ``finfo(float32).min``, probabilities cast to the value dtype
before ``@ v``. Global layers are causal; local layers see the current token and the previous
``window_size - 1``.

- ``dense``: the [query, key] scores of the whole sequence at once. Decode steps always use it.
- ``blockwise``: pure JAX, for every backend. Queries go in blocks of ``BLOCK`` through a loop; each block
  sees only the keys it can attend to (all keys before the block's end for a global layer, the block and
  the ``window_size - 1`` keys before it for a local layer), and is rematerialised in the backward pass,
  so no [T, T] array exists in the forward or the backward pass: memory grows linearly in T, and a local
  layer costs O(T x window).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, NVIDIA GPUs only.
- ``auto``: cuDNN on a GPU in bfloat16/float16, otherwise blockwise for sequences longer than
  ``DENSE_UP_TO`` and dense for shorter ones.

Rows of left padding (queries that are padding themselves) follow the reference only in ``dense`` and in the
global layers of ``blockwise``: the reference lets such a row attend uniformly to every key whose logit is
``finfo.min``, including keys outside a local window, which ``blockwise`` never visits. Those rows' outputs
are never used (no token is predicted from padding), and every real token's row is the reference's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = jnp.finfo(jnp.float32).min
IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn")
BLOCK = 128  # queries per block in `blockwise`
DENSE_UP_TO = 1024  # `auto` on a CPU (or TPU): dense attention up to this many tokens, blockwise beyond


def check_implementation(implementation: str) -> str:
    """``implementation`` if this backend can run it, else a ValueError naming those it can."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    runnable = available()
    if implementation not in runnable:
        raise ValueError(
            f"attention {implementation!r} cannot run on the {jax.default_backend()} backend; "
            f"available here: {', '.join(runnable)}"
        )
    return implementation


def available() -> tuple[str, ...]:
    """The implementations this process's backend can run."""
    gpu = jax.default_backend() == "gpu"
    return ("auto", "dense", "blockwise", *(("cudnn",) if gpu else ()))


def choose(implementation: str, seq_len: int, dtype) -> str:
    """The implementation ``auto`` (or a named one) means for a self-attention over ``seq_len`` tokens in
    ``dtype`` (cuDNN's fused attention takes 16-bit inputs only)."""
    if implementation != "auto":
        return implementation
    if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "blockwise" if seq_len > DENSE_UP_TO else "dense"


def masks(query_len: int, key_len: int, window: int) -> dict[str, jax.Array]:
    """Boolean ``[query, key]`` masks of what each attention kind may see.

    Queries are the last ``query_len`` of ``key_len`` positions in the sequence (slot indices, as in the
    reference, not ``position_ids``). Local attention keeps ``key > query - window``.
    """
    q = jnp.arange(key_len - query_len, key_len)[:, None]
    k = jnp.arange(key_len)[None, :]
    causal = k <= q
    return {"global": causal, "local": causal & (k > q - window)}


def padding_bias(causal: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Additive ``[batch, 1, query, key]`` float32 bias hiding padded keys, built as the reference builds it.

    It is added on top of the kind's own mask, so a query with nothing but padding before it (a
    left-padding slot) ends up attending uniformly to its causal keys instead of producing NaN, which
    keeps even the logits at padded positions equal to the reference.
    """
    visible = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)


def dense(q, k, v, mask, bias=None):
    """Unscaled dot-product attention, heads-major: q [b, h, q, d]; k, v [b, h, k, d]; ``mask`` broadcasts
    to [b, h, q, k] (True = may attend); ``bias`` is added after masking. Returns [b, h, q, d]."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.where(mask, scores, MASK_VALUE)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def blockwise(q, k, v, kind: str, window: int, attention_mask=None, block: int = BLOCK, unroll: int | bool = 1):
    """``dense`` self-attention (queries and keys the same ``T`` positions) one block of ``block`` queries at a
    time, each over only the keys it may see, rematerialised in the backward pass. ``unroll`` is the block
    loop's (``lax.scan``'s): unrolled, XLA's cost analysis counts every block (it counts a loop body once)."""
    t = q.shape[2]
    block = min(block, t)
    blocks = math.ceil(t / block)
    # Keys a block needs: everything up to its end (global), or the block and window - 1 keys before it.
    span = blocks * block if kind == "global" else block + block * math.ceil((window - 1) / block)
    front = span - block  # key padding in front, so the first blocks' windows start before position 0
    pad = lambda x, before: jnp.pad(x, ((0, 0), (0, 0), (before, blocks * block - t), (0, 0)))
    q = pad(q, 0)
    k, v = pad(k, front), pad(v, front)
    valid = jnp.ones((q.shape[0], t), bool) if attention_mask is None else attention_mask.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (front, blocks * block - t)))

    @jax.checkpoint
    def one(i):
        start = i * block
        q_block = jax.lax.dynamic_slice_in_dim(q, start, block, axis=2)
        k_block, v_block = (jax.lax.dynamic_slice_in_dim(x, start + block - span + front, span, axis=2) for x in (k, v))
        queries = start + jnp.arange(block)[:, None]
        keys = start + block - span + jnp.arange(span)[None, :]  # true positions; negative ones are padding
        mask = (keys <= queries) & (keys >= 0)
        if kind == "local":
            mask = mask & (keys > queries - window)
        bias = None
        if attention_mask is not None:
            visible = jax.lax.dynamic_slice_in_dim(valid, start + block - span + front, span, axis=1)
            bias = padding_bias((keys <= queries) & (keys >= 0), visible)
        return dense(q_block, k_block, v_block, mask, bias)

    _, out = jax.lax.scan(lambda _, i: (None, one(i)), None, jnp.arange(blocks), unroll=unroll)  # [blocks, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(*q.shape[:2], blocks * block, q.shape[-1])
    return out[:, :, :t]


def cudnn(q, k, v, kind: str, window: int, attention_mask=None):
    """cuDNN's fused attention (``jax.nn.dot_product_attention``) with ``scale=1.0``, causal, and the local
    window as ``local_window_size``; padding as the reference's additive bias."""
    bias = None
    if attention_mask is not None:
        t = q.shape[2]
        bias = padding_bias(masks(t, t, window)["global"], attention_mask).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q.swapaxes(1, 2),
        k.swapaxes(1, 2),
        v.swapaxes(1, 2),
        bias=bias,
        scale=1.0,
        is_causal=True,
        local_window_size=(window - 1, 0) if kind == "local" else None,
        implementation="cudnn",
    )
    return out.swapaxes(1, 2)


def self_attention(q, k, v, kind: str, window: int, attention_mask=None, implementation: str = "auto"):
    """Attention of a sequence over itself (q, k, v heads-major [b, h, T, d]) with the implementation chosen
    by ``choose``; ``attention_mask`` ([b, T], 1 = token, 0 = padding) hides padded keys."""
    t = q.shape[2]
    implementation = choose(implementation, t, q.dtype)
    if implementation == "blockwise":
        return blockwise(q, k, v, kind, window, attention_mask)
    if implementation == "cudnn":
        return cudnn(q, k, v, kind, window, attention_mask)
    causal = masks(t, t, window)
    bias = None if attention_mask is None else padding_bias(causal["global"], attention_mask)
    return dense(q, k, v, causal[kind], bias)
