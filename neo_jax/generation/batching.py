"""The server's device programs: the state of every slot, the step that advances it, and the per-row samplers.

A slot is one row of one KV cache, its prompt's tokens at cache slots ``0..n-1`` (no padding: every slot
below a row's ``index`` holds a real token). ``step`` runs one program over

- one token for every decoding row (``[slots, 1]``), and
- optionally the next chunk of up to ``lanes`` prompts (``Lanes``: ``[lanes, width]`` tokens, one prompt per
  lane), flattened beside the decoding tokens into one ``[1, slots + lanes * width]`` sequence, so that the
  weights are read once for both.

Every token of the step is written into its row first, in one scatter (read before it, the cache would be
copied whole), and then attends to its row: a decoding token to the slots its layer keeps, a chunk's token to
its row's earlier slots and the chunk's own earlier tokens. So that writing a chunk overwrites nothing its
queries still see, a local layer's ring holds ``window + chunk`` slots (``empty_slots``). When a lane
holds the end of its prompt, its last token's hidden state takes its row's place before the LM head, so the
row's first token is chosen by the same per-row sampler, in the same program, as every decoding row's next.

With a prefix cache (``Pool``), a chunk's keys and values are also copied into pool blocks of
``BLOCK`` tokens (whole blocks only: chunks start at multiples of ``BLOCK``), and ``restore`` copies a
cached prefix's blocks into a row: every slot of a global layer's ring, the last slots a local one holds.

``admit`` is the whole-prompt prefill the server used before chunking (``--prefill-chunk 0``): one prompt
alone at a bucketed width, between steps.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax import lora, sharding, validate
from neo_jax.attention import dense
from neo_jax.evaluate import token_logprobs
from neo_jax.generation.cache import KVCache, _set, init_cache, prefill, ring_slots
from neo_jax.generation.programs import build
from neo_jax.generation.sampling import (
    NEG_INF,
    bad_words,
    min_new_tokens,
    min_p,
    repetition_penalty,
    seed_keys,
    temperature,
)
from neo_jax.shapes import bucket

TOP_LOGPROBS = 5  # the most alternatives per token OpenAI's completions API returns
BLOCK = 16  # tokens per prefix-cache block; prefill chunks are whole blocks
DEFAULT_PREFILL_CHUNK = 64  # tokens per step: on a 2-core CPU, 125M at 16 x 1024 slots, a step of ~1.7 decode steps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling settings ([rows] arrays). Greedy rows hold neutral values (temperature 1, top_k 0,
    top_p 1, min_p 0), so the processors leave them alone."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    sample: jax.Array  # bool: sample, else the most likely token
    key: jax.Array  # typed PRNG keys
    eos: jax.Array  # the row's EOS id (-1: none)
    min_tokens: jax.Array  # no EOS before this many tokens
    bias_ids: jax.Array  # [rows, MAX_LOGIT_BIAS] logit_bias: token ids (padding: 0 with value 0)
    bias_values: jax.Array  # [rows, MAX_LOGIT_BIAS] the numbers added to their logits first
    bad_words: jax.Array  # [rows, MAX_BAD_WORDS, MAX_BAD_LENGTH] banned sequences, right-aligned after -1
    tail: jax.Array  # [rows, MAX_BAD_LENGTH - 1] the prompt's last tokens (-2 before a short prompt)

    @classmethod
    def of(cls, rows: list[dict]) -> RowSampling:
        column = lambda name, dtype: jnp.asarray(np.array([r.get(name, NEUTRAL[name]) for r in rows], dtype))
        bias_ids = np.zeros((len(rows), MAX_LOGIT_BIAS), np.int32)
        bias_values = np.zeros((len(rows), MAX_LOGIT_BIAS), np.float32)
        bad_words = np.full((len(rows), MAX_BAD_WORDS, MAX_BAD_LENGTH), -1, np.int32)
        tail = np.full((len(rows), MAX_BAD_LENGTH - 1), -2, np.int32)
        for i, row in enumerate(rows):
            bias = row.get("logit_bias") or {}
            bias_ids[i, : len(bias)], bias_values[i, : len(bias)] = list(bias), list(bias.values())
            for j, word in enumerate(row.get("bad_words_ids") or ()):
                bad_words[i, j, MAX_BAD_LENGTH - len(word) :] = word
            prompt = list(row.get("tail") or ())[-(MAX_BAD_LENGTH - 1) :]
            tail[i, MAX_BAD_LENGTH - 1 - len(prompt) :] = prompt
        return cls(
            temperature=column("temperature", np.float32),
            top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            repetition_penalty=column("repetition_penalty", np.float32),
            sample=column("sample", bool),
            key=seed_keys([r["seed"] for r in rows]),
            eos=column("eos", np.int32),
            min_tokens=column("min_tokens", np.int32),
            bias_ids=jnp.asarray(bias_ids),
            bias_values=jnp.asarray(bias_values),
            bad_words=jnp.asarray(bad_words),
            tail=jnp.asarray(tail),
        )


NEUTRAL = dict(
    temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, sample=False, seed=0, eos=-1, min_tokens=0
)
MAX_LOGIT_BIAS = 300  # logit_bias entries a request may give
MAX_BAD_WORDS, MAX_BAD_LENGTH = 16, 8  # banned sequences a request may give, and their longest


def _threshold(values, enough, low, high, steps: int = 32):
    """Per row, the largest ``t`` in [low, high] with ``enough(t)`` (monotone: true at ``low``), by bisection:
    a few masked reductions over the vocabulary, where a sort of it costs XLA:CPU ~200 ms per step."""

    def body(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        ok = enough(middle[:, None])
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    return jax.lax.fori_loop(0, steps, body, (low, high))[0][:, None]


def top_k_rows(logits, k):
    """Each row keeps its own ``k`` largest logits (0: all); ties at the k-th value are kept."""
    kth = _threshold(logits, lambda t: (logits >= t).sum(-1) >= k, logits.min(-1), logits.max(-1), steps=48)
    return jnp.where((k[:, None] > 0) & (logits < kth), NEG_INF, logits)


def top_p_rows(logits, p):
    """Each row keeps its smallest set of most likely tokens whose probability reaches its own ``p``."""
    probs = jax.nn.softmax(logits, axis=-1)
    mass = lambda t: jnp.where(probs >= t, probs, 0).sum(-1) >= p
    cut = _threshold(probs, mass, jnp.zeros(probs.shape[:1]), probs.max(-1))
    return jnp.where((p[:, None] < 1) & (probs < cut), NEG_INF, logits)


def sample_rows(logits, keys):
    """One draw per row from softmax(logits), by inverting the cumulative distribution at a uniform number
    from the row's own key (one random number per row instead of a Gumbel draw per vocabulary entry)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.vmap(lambda key: jax.random.uniform(key, (), minval=jnp.finfo(jnp.float32).tiny))(keys)
    return jnp.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(-1), logits.shape[-1] - 1)


def process(logits, seen, settings: RowSampling, steps, history):
    """Every row's logits after its own processors, for its ``steps``-th new token (``seen``: the tokens before
    it; ``history``: the latest of them). Each processor runs only when some row uses it, so an all-greedy
    batch pays for none."""
    s = settings
    sampled = s.sample
    keep = lambda x, _: x
    rows = jnp.arange(logits.shape[0])[:, None]
    x = jax.lax.cond(
        jnp.any(s.bias_values != 0), lambda x: x.at[rows, s.bias_ids].add(s.bias_values), lambda x: x, logits
    )
    x = jax.lax.cond(
        jnp.any(s.repetition_penalty != 1),
        repetition_penalty,
        lambda x, *_: x,
        x,
        seen,
        s.repetition_penalty[:, None],
    )
    x = jax.lax.cond(jnp.any(s.bad_words[..., -1] >= 0), bad_words, lambda x, *_: x, x, history, s.bad_words)
    x = min_new_tokens(x, steps[:, None], s.min_tokens[:, None], s.eos[:, None])
    x = temperature(x, s.temperature[:, None])
    x = jax.lax.cond(jnp.any(sampled & (s.top_k > 0)), top_k_rows, keep, x, s.top_k)
    x = jax.lax.cond(jnp.any(sampled & (s.top_p < 1)), top_p_rows, keep, x, s.top_p)
    return jax.lax.cond(jnp.any(sampled & (s.min_p > 0)), min_p, keep, x, s.min_p[:, None])


def top_logprobs(logits):
    """The raw model's log-probabilities and their ``TOP_LOGPROBS`` largest with their token ids."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return logprobs, ids.astype(jnp.int32), top


def pick(x, settings: RowSampling, steps):
    """Each row's token from its processed logits ``x``, for its ``steps``-th new token: the most likely, or a
    sampling row's inverse-CDF draw at the uniform number of ``fold_in(key, steps)``. The draw is skipped when
    no row samples."""
    greedy = jnp.argmax(x, axis=-1)
    keys = jax.vmap(jax.random.fold_in)(settings.key, steps)
    draw = lambda: jnp.where(settings.sample, sample_rows(x, keys), greedy)
    return jax.lax.cond(jnp.any(settings.sample), draw, lambda: greedy).astype(jnp.int32)


def _choose(logits, seen, settings: RowSampling, steps, history):
    """The next token of every row under its own settings, and the raw model's log-probabilities of it and
    of its ``TOP_LOGPROBS`` most likely alternatives."""
    logprobs, top_ids, top = top_logprobs(logits)
    token = pick(process(logits, seen, settings, steps, history), settings, steps)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return token, (token, chosen, top_ids, top)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The device state of every slot."""

    cache: KVCache  # index: [slots], the next cache slot of each row (``valid``: all true, see ``empty_slots``)
    last: jax.Array  # [slots] the newest token, fed to the next step
    positions: jax.Array  # [slots] position id of ``last``
    seen: jax.Array  # [slots, vocab] tokens in the sequence (repetition penalty)
    history: jax.Array  # [slots, MAX_BAD_LENGTH - 1] the sequence's latest tokens (banned sequences)
    steps: jax.Array  # [slots] tokens generated so far (the sampling key's counter)
    settings: RowSampling
    adapter: jax.Array  # [slots] the row's LoRA adapter (-1: the base model)
    active: jax.Array  # [slots] bool: decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pool:
    """The prefix cache's blocks: per layer, ``[blocks, heads, BLOCK, head_dim]`` keys and values."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Lanes:
    """One step's prompt chunks, one per lane (``[lanes]`` or ``[lanes, width]``). An empty lane has
    ``row`` = the number of slots (every write of it is dropped) and ``count`` 0."""

    row: jax.Array
    start: jax.Array  # cache slot (= position) of the chunk's first token, a multiple of BLOCK
    ids: jax.Array  # [lanes, width] the chunk's tokens, then padding
    targets: jax.Array  # [lanes, width] the prompt token after each one (echo's log-probabilities)
    count: jax.Array  # real tokens in the chunk
    first: jax.Array  # bool: the prompt's first chunk (the row's settings are set)
    final: jax.Array  # bool: the prompt's last chunk (the row's first token is chosen)
    settings: RowSampling
    adapter: jax.Array
    save: jax.Array  # [lanes, width // BLOCK] pool block that takes each whole block of the chunk (else: no block)


def slot_cache(config, count: int, max_len: int, dtype, chunk: int = 0, lookahead: int = 0) -> KVCache:
    """The slots' empty cache; with prefill chunks of up to ``chunk`` tokens, a local layer's ring holds
    ``window + chunk`` slots (at most ``max_len``), so that a chunk written into it overwrites nothing its own
    queries still see (see ``step``). Speculative rounds write ``lookahead`` tokens past a row's last: every
    layer then holds that many more (a row near ``max_len`` writes past it), a local one ``window +
    lookahead`` at least. ``valid`` is all true: a row has no padding."""
    cache = init_cache(config, count, max_len + lookahead, dtype, max(chunk, lookahead))
    return dataclasses.replace(cache, valid=~cache.valid, index=jnp.zeros((count,), jnp.int32))


def empty_slots(config, count: int, max_len: int, dtype, chunk: int = 0, lookahead: int = 0) -> Slots:
    """Empty slots (their cache: ``slot_cache``)."""
    cache = slot_cache(config, count, max_len, dtype, chunk, lookahead)
    zeros = jnp.zeros((count,), jnp.int32)
    return Slots(
        cache=cache,
        last=zeros,
        positions=zeros,
        seen=sharding.constrain(jnp.zeros((count, config.vocab_size), bool), "batch", None),
        history=jnp.full((count, MAX_BAD_LENGTH - 1), -2, jnp.int32),
        steps=zeros,
        settings=RowSampling.of([NEUTRAL] * count),
        adapter=zeros - 1,
        active=jnp.zeros((count,), bool),
    )


def empty_pool(config, blocks: int, dtype) -> Pool:
    shape = (blocks, config.num_heads, BLOCK, config.head_dim)
    layers = range(config.num_layers)
    return Pool(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))


def check_slots(config, max_batch: int, max_len: int | None) -> int:
    """``max_len`` (default: every position of the model) once the slots' shape is checked against it."""
    validate.integer("max_batch", max_batch, least=1)
    max_len = config.max_position_embeddings if max_len is None else max_len
    validate.integer("max_len", max_len, least=2)
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"max_len {max_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    return max_len


def chunk_limit(max_len: int) -> int:
    """The longest prefill chunk a slot of ``max_len`` positions can use: ``max_len`` in whole blocks."""
    return -(-max_len // BLOCK) * BLOCK


def clamped_chunk(prefill_chunk: int, max_len: int) -> int:
    """``prefill_chunk``, or ``chunk_limit(max_len)`` when it is longer: no prompt fills more, and its buffers
    would only take memory (a chunk of a billion tokens would take all of it)."""
    return min(prefill_chunk, chunk_limit(max_len))


def block_bytes(config, dtype) -> int:
    """Bytes of one prefix-cache block: keys and values of ``BLOCK`` tokens in every layer."""
    return 2 * config.num_layers * BLOCK * config.hidden_size * jnp.dtype(dtype).itemsize


def empty_lanes(count: int, width: int, slots: int) -> dict:
    """Host arrays of ``count`` empty lanes (the engine fills some in)."""
    return dict(
        row=np.full(count, slots, np.int32),
        start=np.zeros(count, np.int32),
        ids=np.zeros((count, width), np.int32),
        targets=np.zeros((count, width), np.int32),
        count=np.zeros(count, np.int32),
        first=np.zeros(count, bool),
        final=np.zeros(count, bool),
        adapter=np.full(count, -1, np.int32),
        save=np.full((count, width // BLOCK), np.iinfo(np.int32).max, np.int32),
    )


def _spans(length: int) -> tuple[int, ...]:
    """The static lengths a ring is read at: 128, 256, then multiples of 256, and the whole ring."""
    return tuple(sorted({min(bucket(n), length) for n in range(128, length + 128, 128)}))


def _attend_within(used, length: int, attend):
    """``attend(span)`` for the shortest of ``_spans(length)`` that holds ring entries ``0..used-1``, chosen
    on the device: a ring not yet wrapped holds its slots ``0..used-1`` at entries ``0..used-1``, so a step
    whose rows have written 300 slots reads 512 of a 2048-slot cache, not all of it. (One branch of a
    switch runs; the dense attention over more entries only added masked zeros.)"""
    spans = _spans(length)
    branch = jnp.minimum(jnp.searchsorted(jnp.asarray(spans), used), len(spans) - 1)
    return jax.lax.switch(branch, [partial(attend, span) for span in spans])


def _lane_attention(keys, values, q, lanes: Lanes, window: int | None):
    """Each lane's chunk (``[lanes, heads, width, head_dim]`` queries) attending to its row, the chunk already
    written into it: its row's earlier slots and the chunk's own earlier tokens. A local layer's ring is
    ``window + chunk`` long (``empty_slots``), so writing the chunk overwrote only slots none of its queries
    sees."""
    slots, length = keys.shape[0], keys.shape[2]
    real = lanes.row < slots
    row = jnp.minimum(lanes.row, slots - 1)  # an empty lane reads some row; its output is not used
    start = lanes.start[:, None]
    held = ring_slots(start + lanes.count[:, None], length)[:, None, :]  # [lanes, 1, length]
    query = (start + jnp.arange(q.shape[2]))[:, :, None]  # [lanes, width, 1]
    see = (held >= 0) & (held <= query)
    if window is not None:
        see = see & (held > query - window)
    attend = lambda span: dense(q, keys[row, :, :span], values[row, :, :span], see[:, None, :, :span])
    return _attend_within(jnp.max(jnp.where(real, lanes.start + lanes.count, 0)), length, attend)


def _lane_writes(lanes: Lanes, width: int, length: int, slots: int):
    """Where each lane's tokens go: (rows, ring entries), ``[lanes, width]``; padding (and, in a ring shorter
    than the chunk, all but its last ``length`` tokens) gets an out-of-range row (dropped)."""
    j = jnp.arange(width)[None, :]
    keep = (j < lanes.count[:, None]) & (j >= lanes.count[:, None] - length)
    return jnp.where(keep, lanes.row[:, None], slots), (lanes.start[:, None] + j) % length


def _write(buffer, rows, ring, new):
    """``new`` ([n, heads, head_dim]) into ``buffer`` ([slots, heads, length, head_dim]) at (rows, ring), out of
    range rows dropped. One scatter, and no read of the buffer before it: XLA:CPU then updates the cache in
    place, where any read before the write copies the whole cache (0.4 s a step for 125M at 16 x 1024)."""
    return buffer.at[rows, :, ring].set(new.astype(buffer.dtype), mode="drop")


def _to_blocks(x):
    """``[lanes, heads, width, head_dim]`` -> ``[lanes * width / BLOCK, heads, BLOCK, head_dim]``."""
    lanes, heads, width, dim = x.shape
    return x.reshape(lanes, heads, width // BLOCK, BLOCK, dim).swapaxes(1, 2).reshape(-1, heads, BLOCK, dim)


def step(graphdefs, arrays, slots: Slots, pool: Pool | None, lanes: Lanes | None, echo, decode: bool = True):
    """One token for every decoding row and, with ``lanes``, one chunk of each lane's prompt. Returns the new
    slots and pool, each row's (token, log-probability, top ids, top log-probabilities), meaningful for the
    rows that were decoding or whose prompt ended in this step, and, if ``echo`` (a traced bool), the
    log-probabilities of each lane's ``targets`` with their alternatives (else zeros: the branch is skipped).
    ``decode`` False (static; for when no row is decoding): only the lanes go through the model."""
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    count = slots.last.shape[0]
    config = model.config
    decoding = slots.active if decode else jnp.zeros_like(slots.active)
    leading = count if decode else 0  # the decoding rows' tokens before the lanes'
    windows = {"global": None, "local": config.window_size}
    lengths = {kind: length for kind, length in zip(config.attention_layers, (k.shape[2] for k in slots.cache.keys))}
    index = slots.cache.index[:, None]
    visible = {}  # per layer kind, once per step: [slots, 1, 1, length]
    for kind, length in lengths.items():
        held = ring_slots(index + 1, length)
        see = held >= 0 if windows[kind] is None else (held >= 0) & (held > index - windows[kind])
        visible[kind] = see[:, None, None, :]
    if lanes is None:
        tokens, positions, adapters = slots.last[:, None], slots.positions[:, None], slots.adapter[:, None]
    else:
        width = lanes.ids.shape[1]
        flat = lambda rows, lane: jnp.concatenate([rows[:leading], lane.reshape(-1)])[None]
        tokens = flat(slots.last, lanes.ids)
        real = jnp.arange(width)[None, :] < lanes.count[:, None]
        positions = flat(slots.positions, jnp.where(real, lanes.start[:, None] + jnp.arange(width), 0))  # padding: 0
        adapters = flat(slots.adapter, jnp.repeat(lanes.adapter, width))
    lora.select(periods, adapters)

    def attention(layer, kind, q, k, v, state):
        cache, pool = state
        keys, values = cache.keys[layer], cache.values[layer]
        length = keys.shape[2]
        if lanes is None:
            rows = jnp.where(decoding, jnp.arange(count), count)  # rows not decoding: dropped
            ring = cache.index % length
            keys, values = _write(keys, rows, ring, k[:, :, 0]), _write(values, rows, ring, v[:, :, 0])
            out = dense(q, keys, values, visible[kind])
        else:
            heads, dim = q.shape[1], q.shape[3]
            rows_of = lambda x: x[0, :, :leading].swapaxes(0, 1)  # [leading, heads, head_dim]
            lane = lambda x: x[0, :, leading:].reshape(heads, -1, width, dim).swapaxes(0, 1)
            lane_rows, lane_ring = _lane_writes(lanes, width, length, count)
            rows = jnp.concatenate([jnp.where(decoding, jnp.arange(count), count)[:leading], lane_rows.reshape(-1)])
            ring = jnp.concatenate([(cache.index % length)[:leading], lane_ring.reshape(-1)])
            flat = lambda x: jnp.concatenate([rows_of(x), lane(x).swapaxes(1, 2).reshape(-1, heads, dim)])
            keys, values = _write(keys, rows, ring, flat(k)), _write(values, rows, ring, flat(v))
            chunk = _lane_attention(keys, values, lane(q), lanes, windows[kind]).swapaxes(0, 1).reshape(heads, -1, dim)
            if decode:
                out = dense(rows_of(q)[:, :, None], keys, values, visible[kind])
                chunk = jnp.concatenate([out[:, :, 0].swapaxes(0, 1), chunk], axis=1)
            out = chunk[None]
            if pool is not None:
                at = lanes.save.reshape(-1)
                pool = Pool(
                    _set(pool.keys, layer, pool.keys[layer].at[at].set(_to_blocks(lane(k)), mode="drop")),
                    _set(pool.values, layer, pool.values[layer].at[at].set(_to_blocks(lane(v)), mode="drop")),
                )
        cache = dataclasses.replace(cache, keys=_set(cache.keys, layer, keys), values=_set(cache.values, layer, values))
        return out, (cache, pool)

    cache = slots.cache
    seen, settings, steps, adapter = slots.seen, slots.settings, slots.steps, slots.adapter
    history = slots.history
    if lanes is not None:  # a prompt's first chunk sets its row up; every chunk's tokens are seen
        starting = jnp.where(lanes.first, lanes.row, count)
        settings = jax.tree.map(lambda rows, new: rows.at[starting].set(new, mode="drop"), settings, lanes.settings)
        history = history.at[starting].set(lanes.settings.tail, mode="drop")
        seen = seen.at[starting].set(False, mode="drop")
        steps = steps.at[starting].set(0, mode="drop")
        adapter = adapter.at[starting].set(lanes.adapter, mode="drop")
        seen = seen.at[jnp.where(real, lanes.row[:, None], count), lanes.ids].set(True, mode="drop")
    hidden, (cache, pool) = model.transform(tokens, positions, attention, (cache, pool), periods)
    if lanes is None:
        rows_hidden = hidden[:, 0]
        ending = jnp.zeros((count,), bool)
        end = cache.index
    else:
        rows_hidden = hidden[0, :count] if decode else jnp.zeros((count, hidden.shape[-1]), hidden.dtype)
        chunks = hidden[0, leading:].reshape(-1, width, hidden.shape[-1])
        last = chunks[jnp.arange(chunks.shape[0]), jnp.maximum(lanes.count - 1, 0)]
        finishing = jnp.where(lanes.final, lanes.row, count)
        rows_hidden = rows_hidden.at[finishing].set(last, mode="drop")
        ending = jnp.zeros((count,), bool).at[finishing].set(True, mode="drop")
        end = cache.index.at[finishing].set(lanes.start + lanes.count, mode="drop")
    logits = model.logits(rows_hidden[:, None])[:, 0]
    token, out = _choose(logits, seen, settings, steps, history)
    produced = decoding | ending
    rows = jnp.arange(count)
    slots = Slots(
        cache=dataclasses.replace(cache, index=jnp.where(decoding, cache.index + 1, end)),
        last=jnp.where(produced, token, slots.last),
        positions=jnp.where(decoding, slots.positions + 1, jnp.where(ending, end, slots.positions)),
        seen=seen.at[rows, token].set(seen[rows, token] | produced),
        history=jnp.where(produced[:, None], appended(history, token), history),
        steps=steps + produced,
        settings=settings,
        adapter=adapter,
        active=produced,
    )
    if lanes is None:
        return slots, pool, out, None

    return slots, pool, out, (_prompt_logprobs(echo, model, chunks, lanes.targets), _lane_sums(chunks, lanes, last))


def _lane_sums(chunks, lanes: Lanes, last):
    """Each lane's final hidden states summed over its real tokens, plain and weighted by position + 1, and its
    last token's: ``[lanes, 3, embed]`` float32, what an embedding's pooling adds up chunk by chunk
    (``neo_jax.embed.from_sums``)."""
    width = chunks.shape[1]
    real = (jnp.arange(width)[None, :] < lanes.count[:, None]).astype(jnp.float32)
    weight = real * (lanes.start[:, None] + jnp.arange(1, width + 1)[None, :]).astype(jnp.float32)
    hidden = chunks.astype(jnp.float32)
    total = jnp.einsum("lwh,lw->lh", hidden, real)
    weighted = jnp.einsum("lwh,lw->lh", hidden, weight)
    return jnp.stack([total, weighted, last.astype(jnp.float32)], axis=1)


def appended(history, token):
    """Each row's latest tokens once ``token`` ([rows]) follows them."""
    return jnp.concatenate([history[:, 1:], token[:, None].astype(history.dtype)], axis=1)


def _prompt_logprobs(echo, model, hidden, targets):
    """If ``echo`` (a traced bool), the log-probabilities of ``targets`` ([rows, n]) under the LM head of
    ``hidden`` ([rows, n, embed]) and their ``TOP_LOGPROBS`` alternatives; else zeros (the branch is skipped,
    so steps that do not ask pay nothing)."""

    def compute():
        logits = model.logits(hidden)
        top_logprobs, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), TOP_LOGPROBS)
        return token_logprobs(logits, targets), top_ids.astype(jnp.int32), top_logprobs

    return jax.lax.cond(echo, compute, lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(compute)))


def _restore_layer(pooled, cached, row, blocks, end):
    """One layer's ring for ``row`` with slots ``0..end-1`` taken from pool ``blocks`` (in order)."""
    heads, dim = pooled.shape[1], pooled.shape[3]
    sequence = pooled[blocks].swapaxes(0, 1).reshape(heads, -1, dim)  # [heads, blocks * BLOCK, dim]
    held = ring_slots(end, cached.shape[2])  # the slot each ring entry holds (negative: none yet)
    # Entries that hold no slot get some block's values: no step reads them before writing them, and not
    # reading the row keeps the write in place (see _write).
    return cached.at[row].set(sequence[:, jnp.clip(held, 0, sequence.shape[1] - 1)])


def restore(slots: Slots, pool: Pool, row, blocks, count):
    """Copy pool ``blocks[:count]`` (the first ``count`` blocks of a prompt, in order) into ``row``'s cache."""
    end = count * BLOCK
    fill = lambda pooled, cached: tuple(
        _restore_layer(p, c, row, blocks, end) for p, c in zip(pooled, cached, strict=True)
    )
    cache = dataclasses.replace(
        slots.cache, keys=fill(pool.keys, slots.cache.keys), values=fill(pool.values, slots.cache.values)
    )
    return dataclasses.replace(slots, cache=cache)


def release(slots: Slots, free):
    return dataclasses.replace(slots, active=slots.active & ~free)


def admit(graphdefs, arrays, slots: Slots, slot, input_ids, attention_mask, seen, settings: RowSampling, adapter, echo):
    """The whole-prompt prefill (``--prefill-chunk 0``): prefill one left-padded prompt [1, T], shift its cache
    row so that its n real tokens take slots 0..n-1, write it into row ``slot``, and choose its first token.
    If ``echo`` (a traced bool) also compute the log-probabilities of the prompt's tokens 1..T-1 and their
    alternatives (else zeros: the branch is skipped, so requests that do not ask pay nothing)."""
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    width = input_ids.shape[1]
    n = attention_mask.sum().astype(jnp.int32)
    max_len = slots.cache.valid.shape[1]
    lora.select(periods, jnp.full(input_ids.shape, adapter))
    logits, cache, hidden = prefill(model, periods, input_ids, attention_mask, max_len)
    shift = width - n  # the left padding: roll it out of the way (ring entry r holds slot r mod length)
    put = lambda rows, row: jax.lax.dynamic_update_slice_in_dim(rows, jnp.roll(row, -shift, axis=2), slot, axis=0)
    cache = KVCache(
        keys=tuple(put(rows, row) for rows, row in zip(slots.cache.keys, cache.keys, strict=True)),
        values=tuple(put(rows, row) for rows, row in zip(slots.cache.values, cache.values, strict=True)),
        valid=slots.cache.valid,
        index=slots.cache.index.at[slot].set(n),
    )
    token, out = _choose(logits, seen[None], settings, jnp.zeros((1,), jnp.int32), settings.tail)
    at = lambda rows, value: rows.at[slot].set(value)
    slots = Slots(
        cache=cache,
        last=at(slots.last, token[0]),
        positions=at(slots.positions, n),
        seen=at(slots.seen, seen.at[token[0]].set(True)),
        history=at(slots.history, appended(settings.tail, token)[0]),
        steps=at(slots.steps, 1),
        settings=jax.tree.map(lambda rows, row: rows.at[slot].set(row[0]), slots.settings, settings),
        adapter=at(slots.adapter, adapter),
        active=at(slots.active, True),
    )

    prompt = jax.tree.map(lambda x: x[0], _prompt_logprobs(echo, model, hidden[:, :-1], input_ids[:, 1:]))
    return slots, (*jax.tree.map(lambda x: x[0], out), prompt)
