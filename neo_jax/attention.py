"""GPT-Neo's attention, behind one entry point with several implementations.

The numerics are the reference's in every one: logits ``q @ k^T`` with no ``1/sqrt(d)`` scaling, computed
and soft-maxed in float32, masked logits at ``finfo(float32).min``, probabilities cast to the value dtype
before ``@ v`` (splash, flash-style, multiplies them in float32 with the values upcast: the same in
float32, a little more precise in bfloat16). Global layers are causal; local layers see the current token and the previous
``window_size - 1``.

- ``dense``: the [query, key] scores of the whole sequence at once. Decode steps always use it.
- ``blockwise``: pure JAX, for every backend. Queries go in blocks of ``BLOCK`` through a loop; each block
  sees only the keys it can attend to (all keys before the block's end for a global layer, the block and
  the ``window_size - 1`` keys before it for a local layer), and is rematerialised in the backward pass,
  so no [T, T] array exists in the forward or the backward pass: memory grows linearly in T, and a local
  layer costs O(T x window).
- ``splash``: JAX's Pallas splash-attention kernel for TPUs (``CausalMask`` / ``LocalMask``, padding as
  segment ids, sequences padded to a multiple of 128), split over the mesh's batch and head axes with
  ``jax.shard_map``. On the CPU it runs only in Pallas' interpret mode, inside ``splash_interpret()`` (tests).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, NVIDIA GPUs only.
- ``auto``: splash on a TPU, cuDNN on a GPU in bfloat16/float16, otherwise blockwise for sequences longer
  than ``DENSE_UP_TO`` and dense for shorter ones. The platform is that of the mesh in context (so a program
  compiled ahead of time for a TPU slice counts as TPU), else the default backend.

Rows of left padding (queries that are padding themselves) follow the reference only in ``dense`` and in the
global layers of ``blockwise``: the reference lets such a row attend uniformly to every key whose logit is
``finfo.min``, including keys outside a local window, which ``blockwise`` never visits; ``splash`` lets it
attend to the padding before it (its segment), ``cudnn`` to its causal keys. Those rows' outputs are never
used (no token is predicted from padding), and every real token's row is the reference's.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from neo_jax import sharding

MASK_VALUE = jnp.finfo(jnp.float32).min
IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "cudnn")
BLOCK = 128  # queries per block in `blockwise`; `splash` pads sequences to a multiple of it
SPLASH_BLOCKS = (512, 256, 128)  # splash's query and key blocks: the largest that divides the padded length
SPLASH_BLOCK_SIZES = (  # every block size of splash's forward and backward kernels
    *("block_q", "block_kv", "block_kv_compute"),
    *("block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"),
)
DENSE_UP_TO = 1024  # `auto` on a CPU: dense attention up to this many tokens, blockwise beyond

_interpret = contextvars.ContextVar("splash_interpret", default=False)
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_platform", default=None)


@contextlib.contextmanager
def splash_interpret():
    """Within this context ``splash`` may run on any backend, through Pallas' interpreter (slow; for tests of
    its numerics on the CPU). Traced programs keep the mode they were traced in."""
    token = _interpret.set(True)
    try:
        yield
    finally:
        _interpret.reset(token)


@contextlib.contextmanager
def compiling_for(name: str):
    """Within this context ``platform()`` is ``name``: a model built here for ahead-of-time compilation for
    another platform (``neo_jax.aot``) is checked against that platform's implementations."""
    token = _target.set(name)
    try:
        yield
    finally:
        _target.reset(token)


def platform() -> str:
    """The platform programs are traced for: ``compiling_for``'s, else that of the devices of the mesh in
    context, else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return _target.get() or (jax.default_backend() if device is None else device.platform)


def check_implementation(implementation: str) -> str:
    """``implementation`` if this backend can run it, else a ValueError naming those it can."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    runnable = available()
    if implementation not in runnable:
        hint = " (splash runs on TPUs, or anywhere inside neo_jax.attention.splash_interpret())"
        raise ValueError(
            f"attention {implementation!r} cannot run on the {platform()} backend; "
            f"available here: {', '.join(runnable)}{hint if implementation == 'splash' else ''}"
        )
    return implementation


def available() -> tuple[str, ...]:
    """The implementations the platform (``platform()``) can run."""
    here = platform()
    splash = here == "tpu" or _interpret.get()
    return ("auto", "dense", "blockwise", *(("splash",) if splash else ()), *(("cudnn",) if here == "gpu" else ()))


def choose(implementation: str, seq_len: int, dtype, on: str | None = None) -> str:
    """The implementation ``auto`` (or a named one) means for a self-attention over ``seq_len`` tokens in
    ``dtype`` on platform ``on`` (default ``platform()``); cuDNN's fused attention takes 16-bit inputs only."""
    if implementation != "auto":
        return implementation
    on = on or platform()
    if on == "tpu":
        return "splash"
    if on == "gpu" and jnp.dtype(dtype).itemsize == 2:
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
    return _dense(q, k, v, mask, bias)[0]


def _dense(q, k, v, mask, bias=None):
    """``dense``'s output and its probabilities [b, h, q, k] (in the value dtype, as they multiply the values)."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.where(mask, scores, MASK_VALUE)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v), probs


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


def splash(q, k, v, kind: str, window: int, attention_mask=None):
    """JAX's Pallas splash attention (TPU): unscaled logits in float32, the kind as a ``CausalMask`` or a
    ``LocalMask`` of ``window`` keys, padded keys hidden by segment ids (padding 0, tokens 1). The sequence is
    padded at the end to a multiple of ``BLOCK`` (those queries are dropped; no real query sees their keys).
    Under a mesh the kernel runs per shard of the batch and head axes (``jax.shard_map``)."""
    t = q.shape[2]
    length = math.ceil(t / BLOCK) * BLOCK
    block = next(size for size in SPLASH_BLOCKS if length % size == 0)
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, length - t), (0, 0))) for x in (q, k, v))
    args = (q, k, v)
    if attention_mask is not None:
        args += (jnp.pad(jnp.asarray(attention_mask, jnp.int32), ((0, 0), (0, length - t))),)
    interpret = _interpret.get()
    sizes: dict[str, Any] = dict.fromkeys(SPLASH_BLOCK_SIZES, block)

    def run(q, k, v, segments=None):
        shape = (length, length)
        mask = splash_lib.CausalMask(shape) if kind == "global" else splash_lib.LocalMask(shape, (window - 1, 0), 0)
        kernel = splash_lib.make_splash_mha(
            splash_lib.MultiHeadMask([mask] * q.shape[1]),
            block_sizes=splash_lib.BlockSizes(**sizes),
            mask_value=float(MASK_VALUE),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        ids = None if segments is None else splash_lib.SegmentIds(segments, segments)
        return jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, ids)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        split = sharding.spec(("batch", "heads", None, None), q.shape, mesh)
        specs = (split,) * 3 + ((jax.P(split[0], None),) if len(args) == 4 else ())
        run = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=split, check_vma=False)
    out = cast(jax.Array, run(*args))  # splash returns residuals too only when asked to
    return out[:, :, :t]


def self_attention(q, k, v, kind: str, window: int, attention_mask=None, implementation: str = "auto"):
    """Attention of a sequence over itself (q, k, v heads-major [b, h, T, d]) with the implementation chosen
    by ``choose``; ``attention_mask`` ([b, T], 1 = token, 0 = padding) hides padded keys."""
    t = q.shape[2]
    implementation = choose(implementation, t, q.dtype)
    if implementation == "blockwise":
        return blockwise(q, k, v, kind, window, attention_mask)
    if implementation == "splash":
        return splash(q, k, v, kind, window, attention_mask)
    if implementation == "cudnn":
        return cudnn(q, k, v, kind, window, attention_mask)
    return dense_self_attention(q, k, v, kind, window, attention_mask)[0]


def dense_self_attention(q, k, v, kind: str, window: int, attention_mask=None):
    """``dense`` attention of a sequence over itself: its output and its probabilities ``[b, h, T, T]`` (what
    ``output_attentions`` returns, whatever implementation the model uses otherwise)."""
    t = q.shape[2]
    causal = masks(t, t, window)
    bias = None if attention_mask is None else padding_bias(causal["global"], attention_mask)
    return _dense(q, k, v, causal[kind], bias)
