"""Text generation: KV cache, prefill, one jitted decode loop, samplers, beam search, ``TextGenerator``.

Shape of a call: the prompt is left-padded to a bucketed length and run through the model once (prefill),
which fills the KV cache; the tokens then come from one jitted ``lax.while_loop`` over single-token decode
steps that stops as soon as every row has finished. Positions come from the attention mask, as
transformers' ``generate`` derives them, so greedy output equals ``GPTNeoForCausalLM.generate``.

The cache holds keys and values per layer in ring buffers indexed by ``slot % length``: global layers keep
every slot (length = the whole sequence), local layers only their last ``window_size`` slots.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import sharding, validate
from neo_jax.attention import dense, self_attention
from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo

NEG_INF = -jnp.inf


# ------------------------------------------------------------------------------------------- KV cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer.

    ``keys[i]`` / ``values[i]`` are layer ``i``'s ``[batch, heads, length, head_dim]`` ring buffers, with
    ``length = max_len`` for global layers and ``min(window_size, max_len)`` for local ones; sequence slot
    ``s`` lives at ``s % length``. ``valid[b, s]`` says whether slot ``s`` holds a real token (not left
    padding); ``index`` is the slot of the next token.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


def cache_lengths(config: GPTNeoConfig, max_len: int) -> tuple[int, ...]:
    """Ring-buffer length of each layer."""
    return tuple(max_len if kind == "global" else min(config.window_size, max_len) for kind in config.attention_layers)


def cache_bytes(config: GPTNeoConfig, batch: int, max_len: int, dtype=jnp.float32) -> int:
    """Bytes of the KV cache for ``batch`` sequences of ``max_len`` slots."""
    return 2 * batch * config.hidden_size * jnp.dtype(dtype).itemsize * sum(cache_lengths(config, max_len))


def init_cache(config: GPTNeoConfig, batch: int, max_len: int, dtype) -> KVCache:
    """An empty cache; under a mesh (``sharding.use_mesh``) it is split by batch and heads, like the
    activations that fill it."""

    def zeros(shape, names, dtype):
        return sharding.constrain(jnp.zeros(shape, dtype), *names)

    def layer(length):
        return zeros((batch, config.num_heads, length, config.head_dim), ("batch", "heads", None, None), dtype)

    lengths = cache_lengths(config, max_len)
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
    """Store one token's key/value at slot ``cache.index``, in place."""
    at = (0, 0, cache.index % cache.keys[layer].shape[2], 0)
    keys = jax.lax.dynamic_update_slice(cache.keys[layer], k.astype(cache.keys[layer].dtype), at)
    values = jax.lax.dynamic_update_slice(cache.values[layer], v.astype(cache.values[layer].dtype), at)
    return dataclasses.replace(cache, keys=_set(cache.keys, layer, keys), values=_set(cache.values, layer, values))


def _visible(cache: KVCache, length: int, window: int | None):
    """``[batch, 1, 1, length]``: the ring entries the token at slot ``cache.index`` may attend to — real
    tokens, and for a local layer only the last ``window`` slots (a ring of ``window`` entries holds
    nothing older anyway). Ring entry r holds the latest slot s <= index with s % length == r."""
    slots = cache.index - (cache.index - jnp.arange(length)) % length
    visible = slots >= 0 if window is None else (slots >= 0) & (slots > cache.index - window)
    return (visible[None] & jnp.take(cache.valid, jnp.maximum(slots, 0), axis=1))[:, None, None, :]


def prefill(model: GPTNeo, periods, input_ids, attention_mask, max_len: int):
    """Run the whole (left-padded) prompt into a new cache of ``max_len`` slots; return the last position's
    logits [batch, vocab] and the cache. Positions count real tokens only (padding gets 0), as transformers'
    ``generate`` derives them from the attention mask."""
    seq_len = input_ids.shape[1]
    position_ids = jnp.where(attention_mask == 1, jnp.cumsum(attention_mask, axis=1) - 1, 0)
    cache = init_cache(model.config, input_ids.shape[0], max_len, model.dtype)
    window = model.config.window_size

    def attention(layer, kind, q, k, v, cache):
        out = self_attention(q, k, v, kind, window, attention_mask, model.attention)
        return out, _write_prompt(cache, layer, k, v)

    cache = dataclasses.replace(cache, valid=cache.valid.at[:, :seq_len].set(attention_mask.astype(bool)))
    hidden, cache = model.transform(input_ids, position_ids, attention, cache, periods)
    cache = dataclasses.replace(cache, index=jnp.int32(seq_len))
    return model.logits(hidden[:, -1:])[:, 0], cache


def decode_step(model: GPTNeo, periods, tokens, positions, cache: KVCache):
    """One token per row at slot ``cache.index``: logits [batch, vocab] and the updated cache."""
    cache = dataclasses.replace(cache, valid=cache.valid.at[:, cache.index].set(True))
    lengths = dict(zip(model.config.attention_layers, (key.shape[2] for key in cache.keys)))
    windows = {"global": None, "local": model.config.window_size}
    masks = {kind: _visible(cache, length, windows[kind]) for kind, length in lengths.items()}  # once per step

    def attention(layer, kind, q, k, v, cache):
        cache = _write_token(cache, layer, k, v)
        return dense(q, cache.keys[layer], cache.values[layer], masks[kind]), cache

    hidden, cache = model.transform(tokens[:, None], positions[:, None], attention, cache, periods)
    cache = dataclasses.replace(cache, index=cache.index + 1)
    return model.logits(hidden)[:, 0], cache


@dataclasses.dataclass(frozen=True)
class Weights:
    """The model split for generation programs: its graph and parameters, plus the blocks as one module per
    period (``periods``) so that generation runs layer by layer with a static index.

    On the CPU the per-period weights are separate buffers: XLA:CPU copies any slice of a stacked weight
    inside a program, which would double a decode step's memory traffic. They are made once per model
    (one more copy of the block weights, kept while the model lives) and made again if its parameters are
    replaced. On accelerators slicing inside the program is free, so ``periods`` is None and the slices
    are taken there.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    period_graphdef: nnx.GraphDef
    periods: list | None

    @classmethod
    def of(cls, model: GPTNeo) -> Weights:
        graphdef, params = nnx.split(model)
        period_graphdef, stacked = nnx.split(model.periods)
        periods = None
        if jax.default_backend() == "cpu":
            leaves = jax.tree.leaves(stacked)
            cached = _UNSTACKED.get(model)
            if cached is None or any(a is not b for a, b in zip(cached[0], leaves, strict=True)):
                cached = _UNSTACKED[model] = (leaves, _unstack_copy(stacked, model.config.num_periods))
            periods = cached[1]
        return cls(graphdef, params, period_graphdef, periods)


_UNSTACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unstack(stacked, n: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


_unstack_copy = jax.jit(_unstack, static_argnums=1)  # one dispatch instead of one per tensor


def _build(graphdef, params, period_graphdef, periods):
    """Inside a program: the model and its list of per-period block modules."""
    model = nnx.merge(graphdef, params)
    if periods is None:
        periods = _unstack(nnx.state(model.periods), model.config.num_periods)
    return model, [nnx.merge(period_graphdef, state) for state in periods]


# ------------------------------------------------------------------------------------------- samplers
# Small pure functions on float32 logits [batch, vocab], in the order transformers applies them.
def repetition_penalty(logits, seen, penalty):
    """Divide positive (multiply negative) logits of tokens already in the sequence by ``penalty``."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def top_k(logits, k):
    """Keep the ``k`` largest logits (ties at the k-th value are kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p(logits, p):
    """Keep the smallest set of tokens whose probability reaches ``p`` (nucleus), at least one."""
    order = jnp.argsort(logits, axis=-1)  # ascending, as transformers does
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = (cumulative <= 1 - p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove)
    return jnp.where(remove, NEG_INF, logits)


def min_p(logits, p):
    """Drop tokens whose probability is below ``p`` times the most likely token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < p * probs.max(axis=-1, keepdims=True), NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which processors run (static: part of the compiled program); their values are traced arguments."""

    do_sample: bool = False
    repetition_penalty: bool = False
    top_k: int = 0
    top_p: bool = False
    min_p: bool = False


def process_logits(logits, seen, values: dict, sampling: Sampling):
    if sampling.repetition_penalty:
        logits = repetition_penalty(logits, seen, values["repetition_penalty"])
    if sampling.do_sample:
        logits = logits / values["temperature"]
        if sampling.top_k:
            logits = top_k(logits, sampling.top_k)
        if sampling.top_p:
            logits = top_p(logits, values["top_p"])
        if sampling.min_p:
            logits = min_p(logits, values["min_p"])
    return logits


def choose(logits, key, sampling: Sampling):
    if sampling.do_sample:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------- the loop
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
    cache: KVCache
    tokens: jax.Array  # [batch, new] generated tokens (pad after a row finishes)
    last: jax.Array  # [batch] the newest token, fed to the next step
    positions: jax.Array  # [batch] position of ``last``
    finished: jax.Array  # [batch]
    seen: jax.Array  # [batch, vocab] tokens in the sequence (repetition penalty), else [batch, 1]
    step: jax.Array  # number of tokens generated so far
    key: jax.Array


def _emit(state: LoopState, logits, values, sampling: Sampling, eos, pad) -> LoopState:
    """Pick the next token of every row from ``logits`` and record it."""
    logits = process_logits(logits, state.seen, values, sampling)
    token = choose(logits, jax.random.fold_in(state.key, state.step), sampling)
    token = jnp.where(state.finished, pad, token)
    seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True) if sampling.repetition_penalty else state.seen
    return dataclasses.replace(
        state,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        last=token,
        finished=state.finished | (token == eos),
        seen=seen,
        step=state.step + 1,
    )


@partial(jax.jit, static_argnames=("graphdefs", "max_len", "max_new", "sampling"))
def _start(graphdefs, arrays, input_ids, attention_mask, seen, values, key, eos, pad, *, max_len, max_new, sampling):
    """Prefill and pick the first new token."""
    model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    batch = input_ids.shape[0]
    logits, cache = prefill(model, periods, input_ids, attention_mask, max_len)
    state = LoopState(
        cache=cache,
        tokens=jnp.full((batch, max_new), pad, jnp.int32),
        last=jnp.zeros((batch,), jnp.int32),
        positions=attention_mask.sum(axis=1).astype(jnp.int32),  # where the first new token goes
        finished=jnp.zeros((batch,), bool),
        seen=seen,
        step=jnp.int32(0),
        key=key,
    )
    return _emit(state, logits, values, sampling, eos, pad)


@partial(jax.jit, static_argnames=("graphdefs", "sampling"), donate_argnames=("state",))
def _continue(graphdefs, arrays, state: LoopState, stop, values, eos, pad, *, sampling):
    """Decode until ``stop`` tokens exist or every row has finished."""

    def cond(carry):
        state, _ = carry
        return (state.step < stop) & ~jnp.all(state.finished)

    def body(carry):
        # The weights ride in the carry: NNX wants modules built at the trace level that uses them.
        state, arrays = carry
        model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        logits, cache = decode_step(model, periods, state.last, state.positions, state.cache)
        state = _emit(dataclasses.replace(state, cache=cache), logits, values, sampling, eos, pad)
        return dataclasses.replace(state, positions=state.positions + 1), arrays

    return jax.lax.while_loop(cond, body, (state, arrays))[0]


def _to_host(array) -> np.ndarray:
    """A result on the host; in a multi-host run, rows other hosts hold are gathered first."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from neo_jax.distributed import gather

    return np.asarray(gather(array))


def bucket(n: int) -> int:
    """Round a prompt length up so that nearby lengths share one compiled program: 16, 32, 64, 128, 256,
    then multiples of 256."""
    return max(16, 2 ** math.ceil(math.log2(n))) if n <= 256 else 256 * math.ceil(n / 256)


def cache_bucket(n: int) -> int:
    """Round a cache length up to a multiple of 64: decode steps read the whole global cache, so a finer
    rounding than ``bucket`` pays for the rare extra compilation."""
    return 64 * math.ceil(n / 64)


@dataclasses.dataclass
class _Request:
    """A validated, bucketed generation request."""

    input_ids: np.ndarray  # [batch, bucketed prompt] left-padded
    attention_mask: np.ndarray
    eos: int  # -1: never stop early
    pad: int


def _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id) -> _Request:
    input_ids = np.asarray(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"the prompt is empty or not [batch, seq]: input_ids has shape {input_ids.shape}")
    input_ids = validate.token_ids(input_ids, model.config.vocab_size)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    mask = validate.attention_mask(mask[None] if mask.ndim == 1 else mask, input_ids.shape)
    max_new_tokens = validate.integer("max_new_tokens", max_new_tokens, least=0)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None:
            validate.integer(name, value)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings ({limit}); shorten the prompt or ask for fewer tokens"
        )
    pad = _pad_id(eos_token_id, pad_token_id)
    eos = -1 if eos_token_id is None else eos_token_id
    width = bucket(input_ids.shape[1])
    left = width - input_ids.shape[1]
    return _Request(
        input_ids=np.pad(input_ids, ((0, 0), (left, 0)), constant_values=pad).astype(np.int32),
        attention_mask=np.pad(mask, ((0, 0), (left, 0))).astype(np.int32),
        eos=eos,
        pad=pad,
    )


def check_sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, num_beams):
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        validate.real(name, value)
    validate.real("repetition_penalty", repetition_penalty)
    validate.integer("top_k", top_k)
    validate.integer("num_beams", num_beams)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("num_beams > 1 is beam search, which is deterministic: drop do_sample (or use num_beams=1)")
    if num_beams > 1 and repetition_penalty != 1.0:
        raise ValueError("repetition_penalty is not supported with beam search; use num_beams=1 to combine them")


def stream(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the new tokens ``[batch, n]`` chunk by chunk (``chunk_size`` tokens, or all at once).

    Stops early once every row has emitted EOS. Arguments as in ``generate`` (no beam search).
    """
    check_sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, 1)
    validate.integer("seed", seed)
    if chunk_size is not None:
        validate.integer("chunk_size", chunk_size, least=1)
    request = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    if max_new_tokens == 0:
        return
    if do_sample and temperature == 0:
        do_sample = False  # the limit of temperature -> 0 is greedy
    vocab = model.config.vocab_size
    sampling = Sampling(
        do_sample=do_sample,
        repetition_penalty=repetition_penalty != 1.0,
        top_k=min(top_k, vocab) if do_sample else 0,
        top_p=do_sample and top_p < 1.0,
        min_p=do_sample and min_p > 0.0,
    )
    values = {
        "temperature": jnp.float32(temperature or 1.0),
        "top_p": jnp.float32(top_p),
        "min_p": jnp.float32(min_p),
        "repetition_penalty": jnp.float32(repetition_penalty),
    }
    if sampling.repetition_penalty:  # as transformers: every id in the caller's input_ids, padding included
        caller_ids = np.asarray(input_ids).reshape(request.input_ids.shape[0], -1)
        seen = np.zeros((caller_ids.shape[0], vocab), bool)
        seen[np.arange(caller_ids.shape[0])[:, None], caller_ids] = True
    else:
        seen = np.zeros((request.input_ids.shape[0], 1), bool)
    weights = Weights.of(model)
    graphdefs, arrays = (weights.graphdef, weights.period_graphdef), (weights.params, weights.periods)
    max_len = cache_bucket(request.input_ids.shape[1] + max_new_tokens)
    eos, pad = jnp.int32(request.eos), jnp.int32(request.pad)
    mesh = sharding.model_mesh(model)
    with sharding.use_mesh(mesh):
        state = _start(
            graphdefs,
            arrays,
            jnp.asarray(request.input_ids),
            jnp.asarray(request.attention_mask),
            jnp.asarray(seen),
            values,
            jax.random.key(seed),
            eos,
            pad,
            max_len=max_len,
            max_new=cache_bucket(max_new_tokens),
            sampling=sampling,
        )
    yield _to_host(state.tokens[:, :1])  # right after prefill: time to first token
    done = 1
    chunk = chunk_size or max_new_tokens
    while done < max_new_tokens and not bool(state.finished.all()):
        stop = min(done + chunk, max_new_tokens)
        with sharding.use_mesh(mesh):
            state = _continue(graphdefs, arrays, state, jnp.int32(stop), values, eos, pad, sampling=sampling)
        step = int(state.step)
        yield _to_host(state.tokens[:, done:step])
        done = step


def generate(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Continue ``input_ids`` ([batch, seq], left-padded with ``attention_mask`` when rows differ in length).

    Returns ``[batch, seq + max_new_tokens]``: the prompt, then the new tokens; after a row emits
    ``eos_token_id`` the rest of it is ``pad_token_id`` (default: the EOS id). ``eos_token_id=None`` never
    stops early. Greedy by default; ``do_sample`` samples with ``temperature``, ``top_k``, ``top_p`` and
    ``min_p``; ``num_beams > 1`` is beam search with ``length_penalty`` and ``early_stopping`` as in
    transformers. The same ``seed`` gives the same samples.
    """
    check_sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, num_beams)
    prompt = np.asarray(input_ids)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    if num_beams > 1:
        new = beam_search(
            model,
            prompt,
            attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    else:
        chunks = list(
            stream(
                model,
                prompt,
                attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                seed=seed,
            )
        )
        new = np.concatenate(chunks, axis=1) if chunks else np.zeros((prompt.shape[0], 0), np.int32)
    pad = _pad_id(eos_token_id, pad_token_id)
    filled = np.full((prompt.shape[0], max_new_tokens), pad, np.int64)
    filled[:, : new.shape[1]] = new
    return np.concatenate([prompt.astype(np.int64), filled], axis=1)


def _pad_id(eos_token_id, pad_token_id) -> int:
    return pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)


# ------------------------------------------------------------------------------------------- beam search
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BeamState:
    """transformers' vectorised beam search state: ``running_*`` are the live beams, the others the best
    finished hypotheses, per batch row ([batch, beams, ...])."""

    cache: KVCache
    logits: jax.Array  # [batch * beams, vocab] for the step about to be taken
    positions: jax.Array  # [batch * beams]
    running_sequences: jax.Array  # [batch, beams, new]
    running_scores: jax.Array  # [batch, beams]
    sequences: jax.Array
    scores: jax.Array
    finished: jax.Array  # [batch, beams]
    improvable: jax.Array  # [batch, 1]: the early-stop heuristic is not yet satisfied
    all_hit_stop: jax.Array  # every candidate of the last step hit EOS or the length limit
    step: jax.Array


def _gather_beams(x, indices):
    """x [batch, n, ...], indices [batch, k] -> [batch, k, ...]."""
    return jnp.take_along_axis(x, indices.reshape(*indices.shape, *([1] * (x.ndim - 2))), axis=1)


def _beam_step(state: BeamState, *, num_beams, max_new, eos, length_penalty, early_stopping) -> tuple:
    """One selection step of transformers' ``_beam_search``; returns the new state and the flat indices of
    the batch*beams rows the next step continues from (to reorder the cache)."""
    batch = state.running_scores.shape[0]
    vocab = state.logits.shape[-1]
    keep = 2 * num_beams
    log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(batch, num_beams, vocab)
    log_probs = (log_probs + state.running_scores[:, :, None]).reshape(batch, num_beams * vocab)
    top_scores, top_indices = jax.lax.top_k(log_probs, keep)
    origin, tokens = top_indices // vocab, (top_indices % vocab).astype(jnp.int32)
    top_sequences = _gather_beams(state.running_sequences, origin)
    top_sequences = jax.lax.dynamic_update_slice(top_sequences, tokens[:, :, None], (0, 0, state.step))
    hit_stop = (tokens == eos) | (state.step + 1 >= max_new)

    # The live beams: the best candidates that did not just stop.
    running_scores = top_scores + hit_stop * -1.0e9
    live = jax.lax.top_k(running_scores, num_beams)[1]
    running_sequences = _gather_beams(top_sequences, live)
    running_scores = _gather_beams(running_scores, live)
    rows = (_gather_beams(origin, live) + jnp.arange(batch)[:, None] * num_beams).reshape(-1)

    # The finished hypotheses: merge in the candidates among the top `num_beams` that just stopped.
    just_finished = hit_stop & (jnp.arange(keep) < num_beams)[None]
    length = (state.step + 1).astype(jnp.float32)
    final = top_scores / length**length_penalty
    full = jnp.all(state.finished, axis=-1, keepdims=True) & (early_stopping is True)
    final = final + full * -1.0e9 + (~state.improvable) * -1.0e9 + (~just_finished) * -1.0e9
    merged_scores = jnp.concatenate([state.scores, final], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    sequences = _gather_beams(jnp.concatenate([state.sequences, top_sequences], axis=1), best)
    scores = _gather_beams(merged_scores, best)
    finished = _gather_beams(jnp.concatenate([state.finished, just_finished], axis=1), best)

    # Could a live beam still beat the worst finished one?
    step = state.step + 1
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = jnp.float32(max_new)
    else:
        best_length = step.astype(jnp.float32)
    best_possible = running_scores[:, :1] / best_length**length_penalty
    worst_finished = jnp.where(finished, scores.min(axis=1, keepdims=True), -1.0e9)
    improvable = state.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
    state = dataclasses.replace(
        state,
        running_sequences=running_sequences,
        running_scores=running_scores,
        sequences=sequences,
        scores=scores,
        finished=finished,
        improvable=improvable,
        all_hit_stop=jnp.all(hit_stop),
        step=step,
    )
    return state, rows, running_sequences[:, :, state.step - 1].reshape(-1)


@partial(
    jax.jit,
    static_argnames=("graphdefs", "num_beams", "max_len", "max_new", "length_penalty", "early_stopping"),
)
def _beam_search(
    graphdefs,
    arrays,
    input_ids,
    attention_mask,
    eos,
    pad,
    *,
    num_beams,
    max_len,
    max_new,
    length_penalty,
    early_stopping,
):
    model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    batch = input_ids.shape[0] // num_beams
    logits, cache = prefill(model, periods, input_ids, attention_mask, max_len)
    empty = jnp.full((batch, num_beams, max_new), pad, jnp.int32)
    state = BeamState(
        cache=cache,
        logits=logits,
        positions=attention_mask.sum(axis=1).astype(jnp.int32),
        running_sequences=empty,
        running_scores=jnp.zeros((batch, num_beams)).at[:, 1:].set(-1.0e9),
        sequences=empty,
        scores=jnp.full((batch, num_beams), -1.0e9),
        finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        all_hit_stop=jnp.bool_(False),
        step=jnp.int32(0),
    )

    def cond(carry):
        state, _ = carry
        open_beam = ~(jnp.all(state.finished) & (early_stopping is True))
        return jnp.any(state.improvable) & open_beam & ~state.all_hit_stop

    def body(carry):
        state, arrays = carry
        model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        state, rows, tokens = _beam_step(
            state,
            num_beams=num_beams,
            max_new=max_new,
            eos=eos,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        reorder = lambda x: jnp.take(x, rows, axis=0)
        cache = dataclasses.replace(
            state.cache, keys=tuple(map(reorder, state.cache.keys)), values=tuple(map(reorder, state.cache.values))
        )
        logits, cache = decode_step(model, periods, tokens, state.positions, cache)
        return dataclasses.replace(state, cache=cache, logits=logits, positions=state.positions + 1), arrays

    state, _ = jax.lax.while_loop(cond, body, (state, arrays))
    return state.sequences[:, 0]


def beam_search(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """transformers' beam search (``num_return_sequences=1``): the new tokens ``[batch, max_new_tokens]`` of
    the best hypothesis per row. ``early_stopping``: True stops a row once ``num_beams`` hypotheses are
    finished; False (default) and "never" use transformers' heuristics for whether a live beam can still win."""
    validate.real("length_penalty", length_penalty)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    request = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    if max_new_tokens == 0:
        return np.zeros((request.input_ids.shape[0], 0), np.int32)
    weights = Weights.of(model)
    with sharding.use_mesh(sharding.model_mesh(model)):
        new = _beam_search(
            (weights.graphdef, weights.period_graphdef),
            (weights.params, weights.periods),
            jnp.asarray(np.repeat(request.input_ids, num_beams, axis=0)),
            jnp.asarray(np.repeat(request.attention_mask, num_beams, axis=0)),
            jnp.int32(request.eos),
            jnp.int32(request.pad),
            num_beams=num_beams,
            max_len=cache_bucket(request.input_ids.shape[1] + max_new_tokens),
            max_new=max_new_tokens,
            length_penalty=float(length_penalty),
            early_stopping=early_stopping,
        )
    return _to_host(new)


# ------------------------------------------------------------------------------------------- text level
class TextGenerator:
    """Prompts in, continuations out, with the model's own Hugging Face tokenizer.

    ``TextGenerator(model_or_src)`` takes a loaded ``GPTNeo`` or anything ``from_pretrained`` reads; the
    tokenizer comes from the same directory (``transformers.AutoTokenizer``) unless one is passed. Prompts
    are left-padded into one batch; generation stops at the model's EOS token.
    """

    def __init__(
        self, model_or_src, *, tokenizer=None, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto"
    ):
        if isinstance(model_or_src, GPTNeo):
            self.model = model_or_src
        else:
            from neo_jax.convert import from_pretrained

            self.model = from_pretrained(model_or_src, dtype=dtype, param_dtype=param_dtype, attention=attention)
        if tokenizer is None:
            if self.model.source_dir is None:
                raise ValueError("this model was not loaded from a directory: pass tokenizer=... explicitly")
            from neo_jax.convert import load_tokenizer

            tokenizer = load_tokenizer(self.model.source_dir)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.new_tokens = 0

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not prompts or any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one non-empty prompt")
        encoded = self.tokenizer(prompts, padding=True, return_tensors="np")
        if encoded["input_ids"].shape[1] == 0 or not encoded["attention_mask"].any(axis=1).all():
            raise ValueError("a prompt encodes to no tokens")
        return encoded["input_ids"], encoded["attention_mask"]

    def _ids(self, **sampling):
        return {"eos_token_id": self.model.config.eos_token_id, "pad_token_id": self.tokenizer.pad_token_id, **sampling}

    def decode(self, tokens: np.ndarray, stop: list[str] | None = None) -> str:
        eos = self.model.config.eos_token_id
        tokens = [int(t) for t in tokens]
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        return _cut(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)

    def __call__(
        self, prompts: str | list[str], *, max_new_tokens: int = 50, stop: list[str] | None = None, **sampling
    ) -> list[str]:
        """Continuations of ``prompts`` (without the prompt), cut before any of the ``stop`` strings.
        ``sampling``: the keyword arguments of ``generate``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_stop(stop)
        input_ids, mask = self.encode(prompts)
        out = generate(self.model, input_ids, mask, max_new_tokens=max_new_tokens, **self._ids(**sampling))
        return [self.decode(row[input_ids.shape[1] :], stop) for row in out]

    def stream(
        self, prompt: str, *, max_new_tokens: int = 50, stop: list[str] | None = None, chunk_size: int = 8, **sampling
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as tokens are produced; ``new_tokens`` then
        counts the tokens this call generated."""
        check_stop(stop)
        input_ids, mask = self.encode([prompt])
        tokens, shown = [], ""
        self.new_tokens = 0
        chunks = stream(
            self.model, input_ids, mask, max_new_tokens=max_new_tokens, chunk_size=chunk_size, **self._ids(**sampling)
        )
        for chunk in chunks:
            tokens.extend(chunk[0].tolist())
            self.new_tokens = len(tokens)
            text = self.decode(tokens, stop)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
            if stop and any(s in self.tokenizer.decode(tokens) for s in stop):
                return


def check_stop(stop: list[str] | None) -> None:
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop or ()):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or ():
        if s and s in text:
            text = text[: text.index(s)]
    return text
